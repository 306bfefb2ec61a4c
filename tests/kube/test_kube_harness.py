"""The test control plane itself: scheduling onto simulated GPU nodes, quota
admission, Job controller + kwok completion, garbage collection, the pod
outcome contract, CRD schemas and ServiceAccount kubeconfigs.

Every test runs against the real kube-apiserver / controller-manager /
scheduler / kwok of the session fixture ``kube_cluster``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from hubml_testing.kube import (
    outcome_annotations,
    pod_events,
    service_account_kubeconfig,
    set_pod_outcome,
    wait_for,
)
from hubml_testing.kube_cluster import KubeCluster

pytestmark = pytest.mark.kube

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def pod_body(name: str, resources: dict[str, str] | None = None, tolerate_gpu: bool = True,
             annotations: dict[str, str] | None = None, restart_policy: str = "Never") -> dict[str, Any]:
    res = dict(resources or {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": restart_policy,
            "tolerations": [GPU_TOLERATION] if tolerate_gpu else [],
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/hubml/notebook:1",
                    # extended resources must have requests == limits
                    "resources": {"requests": {"cpu": "100m", **res}, "limits": res},
                }
            ],
        },
    }


async def wait_phase(core: client.CoreV1Api, ns: str, name: str, phase: str) -> client.V1Pod:
    async def check() -> client.V1Pod | None:
        pod = await core.read_namespaced_pod(name, ns)
        return pod if pod.status.phase == phase else None

    return await wait_for(check, what=f"pod {ns}/{name} phase {phase}")


async def node_of(core: client.CoreV1Api, pod: client.V1Pod) -> client.V1Node:
    return await core.read_node(pod.spec.node_name)


# --- nodes -------------------------------------------------------------------


async def test_simulated_nodes_are_ready_with_gpu_labels_and_taints(kube_api: Any) -> None:
    core = client.CoreV1Api(kube_api)
    nodes = {n.metadata.name: n for n in (await core.list_node(label_selector="type=kwok")).items}
    assert {"gpu-a100-0", "gpu-a100-1", "gpu-a100-mig-0", "gpu-h100-mig-0", "gpu-t4-shared-0",
            "cpu-0", "cpu-1"} <= set(nodes)
    for name, node in nodes.items():
        ready = {c.type: c.status for c in node.status.conditions}["Ready"]
        assert ready == "True", name
    a100 = nodes["gpu-a100-0"]
    assert a100.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    assert a100.status.allocatable["nvidia.com/gpu"] == "8"
    assert any(t.key == "nvidia.com/gpu" and t.value == "present" and t.effect == "NoSchedule"
               for t in a100.spec.taints)
    t4 = nodes["gpu-t4-shared-0"]
    assert t4.status.allocatable["nvidia.com/gpu"] == "4"
    assert t4.metadata.labels["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
    assert not nodes["cpu-0"].spec.taints


# --- scheduling --------------------------------------------------------------


async def test_gpu_pod_lands_on_a_gpu_node_and_runs(kube_api: Any, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(kube_namespace, pod_body("gpu1", {"nvidia.com/gpu": "1"}))
    pod = await wait_phase(core, kube_namespace, "gpu1", "Running")
    node = await node_of(core, pod)
    assert int(node.status.allocatable["nvidia.com/gpu"]) >= 1
    assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
    assert pod.status.container_statuses[0].ready is True
    assert pod.status.pod_ip


async def test_cpu_pod_without_toleration_lands_on_a_cpu_node(kube_api: Any, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(kube_namespace, pod_body("cpu", {"cpu": "1"}, tolerate_gpu=False))
    pod = await wait_phase(core, kube_namespace, "cpu", "Running")
    assert pod.spec.node_name in {"cpu-0", "cpu-1"}


async def test_gpu_pod_without_toleration_is_kept_off_gpu_nodes(kube_api: Any, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(kube_namespace, pod_body("notol", {"nvidia.com/gpu": "1"}, tolerate_gpu=False))

    async def failed_scheduling() -> str | None:
        for ev in await pod_events(kube_api, kube_namespace, "notol"):
            if ev.reason == "FailedScheduling":
                return ev.message
        return None

    message = await wait_for(failed_scheduling, what="FailedScheduling event")
    assert "untolerated taint" in message and "nvidia.com/gpu" in message
    pod = await core.read_namespaced_pod("notol", kube_namespace)
    assert pod.status.phase == "Pending" and pod.spec.node_name is None


async def test_nine_gpus_stay_pending_with_insufficient_gpu(kube_api: Any, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(kube_namespace, pod_body("gpu9", {"nvidia.com/gpu": "9"}))

    async def failed_scheduling() -> str | None:
        for ev in await pod_events(kube_api, kube_namespace, "gpu9"):
            if ev.reason == "FailedScheduling":
                return ev.message
        return None

    message = await wait_for(failed_scheduling, what="FailedScheduling event for gpu9")
    assert "Insufficient nvidia.com/gpu" in message
    pod = await core.read_namespaced_pod("gpu9", kube_namespace)
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None
    cond = {c.type: c for c in pod.status.conditions}["PodScheduled"]
    assert cond.status == "False" and cond.reason == "Unschedulable"


@pytest.mark.parametrize(
    ("resource", "node"),
    [("nvidia.com/mig-1g.10gb", "gpu-a100-mig-0"), ("nvidia.com/mig-1g.20gb", "gpu-h100-mig-0")],
)
async def test_mig_request_lands_on_the_mig_node(kube_api: Any, kube_namespace: str, resource: str, node: str) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(kube_namespace, pod_body("mig", {resource: "1"}))
    pod = await wait_phase(core, kube_namespace, "mig", "Running")
    assert pod.spec.node_name == node
    labels = (await node_of(core, pod)).metadata.labels
    assert labels["nvidia.com/mig.strategy"] == "mixed"
    assert int(labels[f"{resource}.count"]) >= 1


async def test_resource_quota_on_gpus_refuses_the_pod_over_it(kube_api: Any, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_resource_quota(
        kube_namespace,
        {"metadata": {"name": "gpus"}, "spec": {"hard": {"requests.nvidia.com/gpu": "1"}}},
    )

    async def quota_computed() -> bool:  # admission refuses everything until status.hard is set
        q = await core.read_namespaced_resource_quota("gpus", kube_namespace)
        return bool(q.status and q.status.hard)

    await wait_for(quota_computed, what="ResourceQuota status")
    await core.create_namespaced_pod(kube_namespace, pod_body("first", {"nvidia.com/gpu": "1"}))
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod(kube_namespace, pod_body("second", {"nvidia.com/gpu": "1"}))
    assert err.value.status == 403
    assert "exceeded quota: gpus" in err.value.body
    assert "requests.nvidia.com/gpu=1" in err.value.body
    names = [p.metadata.name for p in (await core.list_namespaced_pod(kube_namespace)).items]
    assert names == ["first"]


# --- Jobs, kwok completion, garbage collection --------------------------------


def job_body(name: str, completions: int, template_annotations: dict[str, str] | None = None,
             backoff_limit: int = 0) -> dict[str, Any]:
    tmpl = pod_body("unused", annotations=template_annotations)
    del tmpl["metadata"]["name"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "completionMode": "Indexed",
            "backoffLimit": backoff_limit,
            "template": {"metadata": tmpl["metadata"], "spec": tmpl["spec"]},
        },
    }


async def test_indexed_job_of_four_completes_through_kwok(kube_api: Any, kube_namespace: str) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    await batch.create_namespaced_job(kube_namespace, job_body("train", 4))

    async def complete() -> client.V1Job | None:
        job = await batch.read_namespaced_job("train", kube_namespace)
        conds = {c.type: c.status for c in job.status.conditions or []}
        return job if conds.get("Complete") == "True" else None

    job = await wait_for(complete, what="Job train Complete")
    assert job.status.succeeded == 4
    assert job.status.completed_indexes == "0-3"
    pods = (await core.list_namespaced_pod(kube_namespace, label_selector="job-name=train")).items
    assert sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1", "2", "3"]
    assert {p.status.phase for p in pods} == {"Succeeded"}
    assert all(p.status.container_statuses[0].state.terminated.exit_code == 0 for p in pods)


async def test_deleting_a_job_garbage_collects_its_pods(kube_api: Any, kube_namespace: str) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    await batch.create_namespaced_job(kube_namespace, job_body("keep", 2, outcome_annotations("run")))

    async def running_pods() -> list[client.V1Pod]:
        pods = (await core.list_namespaced_pod(kube_namespace, label_selector="job-name=keep")).items
        return pods if len(pods) == 2 and all(p.status.phase == "Running" for p in pods) else []

    pods = await wait_for(running_pods, what="2 running pods of Job keep")
    assert all(p.metadata.owner_references[0].kind == "Job" for p in pods)
    await batch.delete_namespaced_job("keep", kube_namespace, propagation_policy="Background")

    async def pods_gone() -> bool:
        return not (await core.list_namespaced_pod(kube_namespace, label_selector="job-name=keep")).items

    await wait_for(pods_gone, what="garbage collection of Job keep's pods")
    with pytest.raises(ApiException) as err:
        await batch.read_namespaced_job("keep", kube_namespace)
    assert err.value.status == 404


# --- pod outcome contract -----------------------------------------------------


async def test_outcome_fail_sets_failed_phase_and_exit_code(kube_api: Any, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    ann = outcome_annotations("fail", exit_code=3, reason="OOMKilled", message="boom")
    await core.create_namespaced_pod(kube_namespace, pod_body("bad", annotations=ann))
    pod = await wait_phase(core, kube_namespace, "bad", "Failed")
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason, term.message) == (3, "OOMKilled", "boom")


async def test_outcome_patched_on_a_running_pod(kube_api: Any, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(kube_namespace, pod_body("nb", {"nvidia.com/gpu": "1"}))
    await wait_phase(core, kube_namespace, "nb", "Running")
    await set_pod_outcome(kube_api, kube_namespace, "nb", "succeed")
    pod = await wait_phase(core, kube_namespace, "nb", "Succeeded")
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    ready = {c.type: c.status for c in pod.status.conditions}["Ready"]
    assert ready == "False"


async def test_failing_job_pods_fail_the_job(kube_api: Any, kube_namespace: str) -> None:
    batch = client.BatchV1Api(kube_api)
    await batch.create_namespaced_job(
        kube_namespace, job_body("crash", 1, outcome_annotations("fail", exit_code=42), backoff_limit=0)
    )

    async def failed() -> client.V1Job | None:
        job = await batch.read_namespaced_job("crash", kube_namespace)
        conds = {c.type: c for c in job.status.conditions or []}
        return job if "Failed" in conds and conds["Failed"].status == "True" else None

    job = await wait_for(failed, what="Job crash Failed")
    assert {c.type: c.reason for c in job.status.conditions}["Failed"] == "BackoffLimitExceeded"
    core = client.CoreV1Api(kube_api)
    pods = (await core.list_namespaced_pod(kube_namespace, label_selector="job-name=crash")).items
    assert [p.status.container_statuses[0].state.terminated.exit_code for p in pods] == [42]


# --- CRDs ---------------------------------------------------------------------

ISVC = {
    "apiVersion": "serving.kserve.io/v1beta1",
    "kind": "InferenceService",
    "metadata": {"name": "sklearn-iris"},
    "spec": {
        "predictor": {
            "minReplicas": 1,
            "maxReplicas": 3,
            "canaryTrafficPercent": 20,
            "model": {
                "modelFormat": {"name": "sklearn"},
                "storageUri": "s3://models/iris/1",
                "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "2Gi"}},
            },
        }
    },
}

PYTORCHJOB = {
    "apiVersion": "kubeflow.org/v1",
    "kind": "PyTorchJob",
    "metadata": {"name": "ddp"},
    "spec": {
        "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 0},
        "nprocPerNode": "2",
        "pytorchReplicaSpecs": {
            "Master": {
                "replicas": 1,
                "restartPolicy": "OnFailure",
                "template": {"spec": {"containers": [{"name": "pytorch", "image": "x",
                                                       "resources": {"limits": {"nvidia.com/gpu": 2}}}]}},
            },
            "Worker": {
                "replicas": 3,
                "restartPolicy": "OnFailure",
                "template": {"spec": {"tolerations": [GPU_TOLERATION],
                                      "containers": [{"name": "pytorch", "image": "x"}]}},
            },
        },
    },
}

TRAINJOB = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "TrainJob",
    "metadata": {"name": "tj"},
    "spec": {
        "runtimeRef": {"name": "torch-distributed"},
        "trainer": {"image": "x", "numNodes": 2, "resourcesPerNode": {"limits": {"nvidia.com/gpu": "1"}}},
    },
}

CRD_CASES = {
    "inferenceservice": (ISVC, ("serving.kserve.io", "v1beta1", "inferenceservices")),
    "pytorchjob": (PYTORCHJOB, ("kubeflow.org", "v1", "pytorchjobs")),
    "trainjob": (TRAINJOB, ("trainer.kubeflow.org", "v1alpha1", "trainjobs")),
}


def mutate(obj: dict, path: str, value: Any) -> dict:
    out = copy.deepcopy(obj)
    cur = out
    keys = path.split(".")
    for k in keys[:-1]:
        cur = cur[k]
    cur[keys[-1]] = value
    return out


async def create_cr(api: Any, ns: str, kind: str, body: dict) -> dict:
    group, version, plural = CRD_CASES[kind][1]
    return await client.CustomObjectsApi(api).create_namespaced_custom_object(
        group, version, ns, plural, body, field_validation="Strict"
    )


@pytest.mark.parametrize("kind", sorted(CRD_CASES))
async def test_crd_accepts_a_valid_object(kube_api: Any, kube_namespace: str, kind: str) -> None:
    created = await create_cr(kube_api, kube_namespace, kind, CRD_CASES[kind][0])
    assert created["spec"] == {**CRD_CASES[kind][0]["spec"], **created["spec"]}
    assert created["metadata"]["uid"]


@pytest.mark.parametrize(
    ("kind", "path", "value", "expected"),
    [
        ("inferenceservice", "spec.predictor.minReplicas", "two", "must be of type integer"),
        # KServe's CRD leaves canaryTrafficPercent unbounded (its webhook checks it); spec.canary[] is bounded
        ("inferenceservice", "spec.canary", [{"predictor": {"name": "c"}, "trafficPercent": 150}],
         "less than or equal to 100"),
        ("inferenceservice", "spec.canary", [{"trafficPercent": 10}], "spec.canary[0].predictor: Required"),
        ("inferenceservice", "spec.predictor.model.storageURI", "s3://x", 'unknown field "spec.predictor.model.storageURI"'),
        ("inferenceservice", "spec.predictor.model.modelFormat", {"version": "1"}, "spec.predictor.model.modelFormat.name: Required"),
        ("inferenceservice", "spec.predictor.scaleMetric", "gpu", "Unsupported value"),
        ("pytorchjob", "spec.pytorchReplicaSpecs.Chief", {"template": {"spec": {"containers": [{"name": "a"}]}}},
         "keys must be Master or Worker"),
        ("pytorchjob", "spec.pytorchReplicaSpecs.Master.replicas", -1, "greater than or equal to 0"),
        ("pytorchjob", "spec.pytorchReplicaSpecs.Master.restartPolicy", "Sometimes", "Unsupported value"),
        ("pytorchjob", "spec.runPolicy.cleanPodPolicy", "Some", "Unsupported value"),
        ("pytorchjob", "spec.nprocPerNode", "lots", "should match"),
        ("pytorchjob", "spec.pytorchReplicaSpecs.Master.template.spec.containers", [], "should have at least 1 items"),
        ("pytorchjob", "spec.pytorchReplicaSpecs.Master.template.spec.gpus", 2, 'unknown field "spec.pytorchReplicaSpecs.Master.template.spec.gpus"'),
        ("trainjob", "spec.trainer.numNodes", 0, "greater than or equal to 1"),
        ("trainjob", "spec.trainer.resourcesPerNode.limits", {"nvidia.com/gpu": "one"}, "should match"),
        ("trainjob", "spec.runtimeRef", {"kind": "TrainingRuntime"}, "spec.runtimeRef.name: Required"),
        ("trainjob", "spec.managedBy", "me", "ManagedBy must be"),
        ("trainjob", "metadata.name", "Bad_Name", "metadata.name"),
    ],
)
async def test_crd_rejects_wrong_fields(kube_api: Any, kube_namespace: str, kind: str, path: str, value: Any,
                                        expected: str) -> None:
    body = mutate(CRD_CASES[kind][0], path, value)
    with pytest.raises(ApiException) as err:
        await create_cr(kube_api, kube_namespace, kind, body)
    assert err.value.status in (400, 422)
    assert expected in json.loads(err.value.body)["message"]
    group, version, plural = CRD_CASES[kind][1]
    listed = await client.CustomObjectsApi(kube_api).list_namespaced_custom_object(group, version, kube_namespace, plural)
    assert listed["items"] == []


async def test_without_crds_removes_and_restores_them(kube_cluster: KubeCluster, kube_api: Any,
                                                      kube_namespace: str) -> None:
    ext = client.ApiextensionsV1Api(kube_api)
    with kube_cluster.without_crds("inferenceservice"):
        with pytest.raises(ApiException) as err:
            await ext.read_custom_resource_definition("inferenceservices.serving.kserve.io")
        assert err.value.status == 404
        with pytest.raises(ApiException) as err:
            await create_cr(kube_api, kube_namespace, "inferenceservice", ISVC)
        assert err.value.status == 404, err.value.body
        assert "inferenceservice" not in kube_cluster.crds
        # the others stay
        await ext.read_custom_resource_definition("pytorchjobs.kubeflow.org")
    assert "inferenceservice" in kube_cluster.crds
    created = await create_cr(kube_api, kube_namespace, "inferenceservice", ISVC)
    assert created["metadata"]["name"] == "sklearn-iris"


def test_without_crds_rejects_unknown_names(kube_cluster: KubeCluster) -> None:
    with pytest.raises(ValueError, match="unknown CRD name"):
        with kube_cluster.without_crds("notebook"):
            pass


# --- RBAC: ServiceAccount kubeconfig via TokenRequest ------------------------------


async def test_service_account_kubeconfig_has_only_granted_rights(
    kube_cluster: KubeCluster, kube_api: Any, kube_namespace: str, tmp_path: Path
) -> None:
    from kubernetes_asyncio import config

    core, rbac = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    await core.create_namespaced_service_account(kube_namespace, {"metadata": {"name": "reader"}})
    await rbac.create_namespaced_role(kube_namespace, {
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    })
    await rbac.create_namespaced_role_binding(kube_namespace, {
        "metadata": {"name": "reader-pod-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": kube_namespace}],
    })
    path = await service_account_kubeconfig(kube_cluster, kube_api, kube_namespace, "reader", tmp_path / "kc")
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(path), client_configuration=cfg)
    async with client.ApiClient(configuration=cfg) as sa_api:
        sa_core = client.CoreV1Api(sa_api)
        assert (await sa_core.list_namespaced_pod(kube_namespace)).items == []
        with pytest.raises(ApiException) as err:
            await sa_core.create_namespaced_pod(kube_namespace, pod_body("nope"))
        assert err.value.status == 403
        with pytest.raises(ApiException) as err:
            await sa_core.list_namespaced_pod("default")
        assert err.value.status == 403
        assert f"system:serviceaccount:{kube_namespace}:reader" in err.value.body
    with pytest.raises(ValueError, match=">= 600"):
        await service_account_kubeconfig(kube_cluster, kube_api, kube_namespace, "reader", tmp_path / "x", 60)


# --- scale mode -----------------------------------------------------------------


@pytest.mark.slow
async def test_scale_mode_adds_bound_pods_on_tainted_nodes_and_removes_them(
    kube_cluster: KubeCluster, kube_api: Any
) -> None:
    import asyncio

    from hubml_testing.kube_cluster import scale_down, scale_up
    from hubml_testing.kube_manifests import SCALE_LABEL

    core = client.CoreV1Api(kube_api)
    ns = "hubml-scale-test"
    result = await asyncio.to_thread(scale_up, kube_cluster, 10, 60, ns)
    try:
        assert (result["nodes"], result["pods"]) == (10, 60)
        nodes = (await core.list_node(label_selector=f"{SCALE_LABEL}=true")).items
        assert len(nodes) == 10
        assert all(any(t.key == SCALE_LABEL and t.effect == "NoSchedule" for t in n.spec.taints) for n in nodes)

        async def all_running() -> bool:
            pods = (await core.list_namespaced_pod(ns)).items
            return len(pods) == 60 and all(p.status.phase == "Running" for p in pods)

        await wait_for(all_running, what="60 scale pods Running")
        pods = (await core.list_namespaced_pod(ns)).items
        assert {p.spec.node_name for p in pods} == {n.metadata.name for n in nodes}
    finally:
        await asyncio.to_thread(scale_down, kube_cluster, ns)
    assert (await core.list_node(label_selector=f"{SCALE_LABEL}=true")).items == []


async def test_pods_report_their_nodes_own_host_ip(kube_api: Any, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(kube_namespace, pod_body("ip", {"nvidia.com/gpu": "1"}))
    pod = await wait_phase(core, kube_namespace, "ip", "Running")
    node = await node_of(core, pod)
    internal = [a.address for a in node.status.addresses if a.type == "InternalIP"]
    assert internal and pod.status.host_ip == internal[0]
    assert internal[0].startswith("127.0.1.")
