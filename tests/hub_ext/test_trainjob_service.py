"""The Kubeflow Trainer ``TrainJob`` flavour end to end: real JupyterHub + proxy, the service process
(``training_flavour = 'trainjob'``) with its least-privilege ServiceAccount, the test control plane
with the TrainJob CRD (structural schema, no Trainer controller) and an MLflow server.

What the Trainer controller would do is done here by hand, the way it does it: status through the
``status`` subresource (conditions, ``jobsStatus``), and the ``node`` Job of the JobSet whose pods
carry ``jobset.sigs.k8s.io/jobset-name`` (kwok runs them).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from hubml.hub_ext import kube as k
from hubml.hub_ext import ownership, rbac, training_objects
from hubml.hub_ext import policy as pol
from hubml.jobs import TrainSpec
from hubml.profile_config import load_catalogue
from hubml_testing.kube import set_pod_outcome, wait_for
from hubml_testing.kwok import append_container_log

from .conftest import assert_only_owner_sees, running_stack, wait_job_state
from .test_trainjob_objects import PINNED_PROFILES

pytestmark = [pytest.mark.kube, pytest.mark.hub, pytest.mark.slow]

CODE = "import torch.distributed as dist\nprint('hello from a TrainJob worker')\n"

PROFILES = PINNED_PROFILES  # the same catalogue as the builder tests

EXTRA_CONFIG = "\n".join([
    "c.HubMLService.training_flavour = 'trainjob'",
    f"c.HubMLService.profiles = {PROFILES!r}",
    "c.HubMLService.max_active_jobs_per_user = 8",
    # finished TrainJobs are deleted by the first list after they finish (the Trainer has no TTL of its own)
    "c.HubMLService.ttl_seconds_after_finished = 0",
])


@pytest.fixture(scope="module")
async def trainjob_service(kube_cluster, mlflow_server, tmp_path_factory):
    async for svc in running_stack(kube_cluster, mlflow_server, tmp_path_factory.mktemp("hubsvc-trainjob"),
                                   extra_config=EXTRA_CONFIG):
        yield svc


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _set_status(svc, job_id: str, status: dict) -> None:
    """What the Trainer controller does: write the TrainJob's status subresource."""
    await svc.kube.request("PATCH", k.TRAIN_JOB.path(svc.namespace, job_id, "status"), body={"status": status},
                           content_type="application/merge-patch+json")


def _condition(kind: str, reason: str, message: str, status: str = "True") -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}


async def _gone(svc, res, name):
    async def check():
        return await svc.kube.get_or_none(res, svc.namespace, name) is None

    await wait_for(check, timeout=60, what=f"{res.kind} {name} to be deleted")


async def test_trainjob_accepted_with_shape_status_and_isolation(trainjob_service):
    svc = trainjob_service
    status, info = svc.call("GET", "/")
    assert status == 200 and info["training"] == "trainjob", info

    status, job = svc.call("POST", "/jobs", {"code": CODE, "workers": 2, "profile": "a100", "env": {"LR": "0.1"},
                                             "experiment": "trainjob-tests", "run_name": "shape"})
    assert status == 201, job
    job_id = job["id"]
    assert job["state"] == "pending" and job["workers"] == 2 and job["gpus_per_worker"] == 2 and job["run_id"]

    # the TrainJob the API server stored under the CRD schema, nothing pruned
    tj = await svc.kube.get(k.TRAIN_JOB, svc.namespace, job_id)
    assert tj["metadata"]["labels"][ownership.LABEL_USER] == "alice"
    assert tj["metadata"]["labels"][ownership.LABEL_KIND] == "training"
    spec = tj["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    assert spec["managedBy"] == "trainer.kubeflow.org/trainjob-controller"  # the CRD's default
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 2
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["MLFLOW_RUN_ID"] == job["run_id"] and env["LR"] == "0.1" and env["HUBML_JOB_ID"] == job_id
    override = spec["podSpecOverrides"][0]
    assert override["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert override["containers"][0]["volumeMounts"][0] == {"name": "hubml-code", "mountPath": "/hubml/code",
                                                            "readOnly": True}
    assert override["volumes"][0]["configMap"]["name"] == f"{job_id}-code"

    # the ConfigMap and NetworkPolicy belong to the TrainJob; no rendezvous Service (JobSet makes its own)
    uid = tj["metadata"]["uid"]
    for res, name in ((k.CONFIG_MAP, f"{job_id}-code"), (k.NETWORK_POLICY, job_id)):
        obj = await svc.kube.get(res, svc.namespace, name)
        assert [o["uid"] for o in obj["metadata"]["ownerReferences"]] == [uid]
        assert obj["metadata"]["labels"][ownership.LABEL_USER] == "alice"
    np = await svc.kube.get(k.NETWORK_POLICY, svc.namespace, job_id)
    assert np["spec"]["podSelector"] == {"matchLabels": {"jobset.sigs.k8s.io/jobset-name": job_id}}
    assert (await svc.kube.get(k.CONFIG_MAP, svc.namespace, f"{job_id}-code"))["data"]["train.py"] == CODE
    assert await svc.kube.get_or_none(k.SERVICE, svc.namespace, job_id) is None

    # listed for its owner only; another user's token gets 403 everywhere
    status, listed = svc.call("GET", "/jobs")
    assert status == 200 and {j["id"]: j["state"] for j in listed}[job_id] == "pending"
    assert_only_owner_sees(svc, job_id)
    assert (await svc.kube.get(k.TRAIN_JOB, svc.namespace, job_id))["spec"].get("suspend") is False

    # the Trainer reports its node Job ready: running; then Complete: succeeded
    await _set_status(svc, job_id, {"jobsStatus": [{"name": "node", "ready": 1, "active": 1, "succeeded": 0,
                                                    "failed": 0, "suspended": 0}]})
    running = await wait_job_state(svc, job_id, "running")
    assert [w["state"] for w in running["worker_states"]] == ["running", "running"]
    await _set_status(svc, job_id, {"conditions": [_condition("Complete", "JobsCompleted", "jobs completed")],
                                    "jobsStatus": [{"name": "node", "ready": 0, "active": 0, "succeeded": 1,
                                                    "failed": 0, "suspended": 0}]})
    done = await wait_job_state(svc, job_id, "succeeded")
    assert done["finished"] is not None

    # ttl_seconds_after_finished = 0: the list shows it one last time and deletes it, and the garbage
    # collector removes what it owned
    status, listed = svc.call("GET", "/jobs")
    assert status == 200 and {j["id"]: j["state"] for j in listed}[job_id] == "succeeded"
    await _gone(svc, k.TRAIN_JOB, job_id)
    await _gone(svc, k.CONFIG_MAP, f"{job_id}-code")
    await _gone(svc, k.NETWORK_POLICY, job_id)
    status, body = svc.call("GET", f"/jobs/{job_id}")
    assert status == 404, body


async def test_manifest_passes_the_schema_strictly(trainjob_service):
    """Every field the builder writes is in the CRD schema: a strict dry run finds no unknown field."""
    svc = trainjob_service
    policy = pol.Policy(namespace=svc.namespace, catalogue=load_catalogue(PROFILES),
                        default_image="quay.io/hubml/runtime:1", serving_image="quay.io/hubml/serving:1")
    for profile, workers in (("cpu", 1), ("a100", 3), ("mig-small", 2)):
        plan = pol.plan_training(policy, pol.Caller("alice"), TrainSpec(code=CODE, workers=workers, profile=profile,
                                                                        timeout=3600),
                                 job_id=f"train-strict-{profile}", mlflow_env={"MLFLOW_RUN_ID": "r"},
                                 record={"workers": workers})
        manifest = training_objects.train_job(plan)
        accepted = await svc.kube.request("POST", k.TRAIN_JOB.path(svc.namespace), body=manifest,
                                          query={"dryRun": "All", "fieldValidation": "Strict"})
        assert accepted["spec"]["trainer"] == manifest["spec"]["trainer"]
        assert accepted["spec"]["podSpecOverrides"] == manifest["spec"]["podSpecOverrides"]
        assert accepted["spec"]["activeDeadlineSeconds"] == 3600
    # and the schema does refuse what the Trainer API refuses (so the check above can fail)
    bad = training_objects.train_job(plan)
    bad["spec"]["podSpecOverrides"][0]["hostNetwork"] = True
    with pytest.raises(k.KubeError, match="hostNetwork"):
        await svc.kube.request("POST", k.TRAIN_JOB.path(svc.namespace), body=bad,
                               query={"dryRun": "All", "fieldValidation": "Strict"})


async def test_worker_pods_logs_failure_and_the_failed_condition(trainjob_service, kube_cluster, tmp_path):
    """The JobSet's pods (simulated: the node Job the Trainer's JobSet would create, run by kwok) give the
    workers' states and logs; a failed worker fails the job with its rank and exit code."""
    svc = trainjob_service
    status, job = svc.call("POST", "/jobs", {"code": CODE, "workers": 2})
    assert status == 201, job
    job_id = job["id"]
    tj = await svc.kube.get(k.TRAIN_JOB, svc.namespace, job_id)
    selector = training_objects.trainjob_pod_selector(job_id)
    node_job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{job_id}-node-0", "namespace": svc.namespace, "labels": dict(selector),
                     "ownerReferences": [ownership.owner_reference(tj)]},
        "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                 "template": {"metadata": {"labels": dict(selector),
                                           "annotations": {"kwok.hubml.io/outcome": "run"}},
                              "spec": {"restartPolicy": "Never", "subdomain": job_id,
                                       "containers": [{"name": "node", "image": tj["spec"]["trainer"]["image"],
                                                       "command": tj["spec"]["trainer"]["command"]}]}}},
    }
    await svc.kube.create(node_job)

    async def pods_running():
        pods = await svc.kube.list(k.POD, svc.namespace, labels=selector)
        return pods if len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) else None

    pods = await wait_for(pods_running, timeout=60, what="the node Job's 2 Running pods")
    await wait_job_state(svc, job_id, "running")

    # each rank's log, found through the JobSet's labels and read with the service's own rights
    for pod in pods:
        rank = pod["metadata"]["labels"][ownership.COMPLETION_INDEX_LABEL]
        log = tmp_path / f"rank{rank}.log"
        append_container_log(log, [f"rank {rank} epoch 1"])
        await asyncio.to_thread(kube_cluster.serve_logs, svc.namespace, pod["metadata"]["name"], log)
    lines: list[tuple[int, str]] = []

    async def both_ranks():
        status, chunk = await asyncio.to_thread(svc.call, "GET", f"/jobs/{job_id}/logs?wait=2")
        assert status == 200, chunk
        lines[:] = [(line["rank"], line["text"]) for line in chunk["lines"]]
        return len(lines) == 2

    await wait_for(both_ranks, timeout=60, what="both ranks' log lines")
    assert sorted(lines) == [(0, "rank 0 epoch 1"), (1, "rank 1 epoch 1")]
    status, chunk = svc.call("GET", f"/jobs/{job_id}/logs", user="bob")
    assert status == 403, chunk

    rank1 = next(p for p in pods if p["metadata"]["labels"][ownership.COMPLETION_INDEX_LABEL] == "1")
    await set_pod_outcome(svc.api, svc.namespace, rank1["metadata"]["name"], "fail", exit_code=3)
    failed = await wait_job_state(svc, job_id, "failed")
    assert failed["failed_rank"] == 1 and failed["exit_code"] == 3
    assert "Worker 1 exited with code 3" in failed["message"]

    await _set_status(svc, job_id, {"conditions": [_condition("Failed", "JobsFailed", "node job failed")]})
    failed = await wait_job_state(svc, job_id, "failed")
    assert "node job failed" in failed["message"]
    status, again = svc.call("POST", f"/jobs/{job_id}/cancel")
    assert status == 200 and again["state"] == "failed"  # cancel is idempotent on a finished job

    # deleting the TrainJob (here: the expiry in the next list) takes the JobSet's Job and its pods with it
    status, listed = svc.call("GET", "/jobs")
    assert status == 200 and job_id in {j["id"] for j in listed}
    await _gone(svc, k.TRAIN_JOB, job_id)
    await _gone(svc, k.JOB, f"{job_id}-node-0")


async def test_cancel_suspends_and_removes_the_code(trainjob_service):
    svc = trainjob_service
    status, job = svc.call("POST", "/jobs", {"code": CODE, "workers": 3, "profile": "mig-small"})
    assert status == 201, job
    job_id = job["id"]
    tj = await svc.kube.get(k.TRAIN_JOB, svc.namespace, job_id)
    assert tj["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/mig-1g.10gb"] == "1"

    status, cancelled = svc.call("POST", f"/jobs/{job_id}/cancel")
    assert status == 200 and cancelled["state"] == "cancelled", cancelled
    tj = await svc.kube.get(k.TRAIN_JOB, svc.namespace, job_id)
    assert tj["spec"]["suspend"] is True and ownership.ANNOTATION_CANCELLED in tj["metadata"]["annotations"]
    assert await svc.kube.get_or_none(k.CONFIG_MAP, svc.namespace, f"{job_id}-code") is None
    # the network rules stay while the TrainJob exists (a resumed pod must not get internet egress)
    assert await svc.kube.get_or_none(k.NETWORK_POLICY, svc.namespace, job_id) is not None
    status, body = svc.call("GET", f"/jobs/{job_id}")
    assert status == 200 and body["state"] == "cancelled" and body["message"] == "Cancelled by the user."

    # the Trainer's Suspended condition does not make it read as anything but cancelled
    await _set_status(svc, job_id, {"conditions": [_condition("Suspended", "Suspended", "TrainJob is suspended")]})
    status, listed = svc.call("GET", "/jobs")
    assert status == 200 and {j["id"]: j["state"] for j in listed}[job_id] == "cancelled"
    await _gone(svc, k.TRAIN_JOB, job_id)
    await _gone(svc, k.NETWORK_POLICY, job_id)


BAD = [
    ({"code": CODE, "env": {"PET_MASTER_PORT": "1"}}, 400, "PET_MASTER_PORT"),
    ({"code": CODE, "profile": "a100-unpinned"}, 400, "node_selector"),
    ({"code": CODE, "workers": 0}, 400, "workers"),
    ({"code": CODE, "profile": "a100", "workers": 5}, 403, "limit per user is 8"),
]


@pytest.mark.parametrize("body, code, fragment", BAD)
async def test_bad_trainjob_requests_are_refused_and_create_nothing(trainjob_service, body, code, fragment):
    svc = trainjob_service
    status, answer = svc.call("POST", "/jobs", body, user="carol")
    assert status == code and fragment in answer["error"], answer
    for res in (k.TRAIN_JOB, k.CONFIG_MAP, k.NETWORK_POLICY):
        assert await svc.kube.list(res, svc.namespace, labels={ownership.LABEL_USER: "carol"}) == []


@pytest.mark.parametrize("config, fragment", [
    ("c.HubMLService.trainjob_runtime = 'Torch_Distributed'\n", "not a Kubernetes object name"),
    ("c.HubMLService.trainjob_runtime_kind = 'Runtime'\n", "trainjob_runtime_kind"),
    ("c.HubMLService.training_flavour = 'trainer'\n", "training_flavour"),
])
def test_bad_trainjob_configuration_stops_the_service(tmp_path, config, fragment):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("c = get_config()  # noqa\nc.HubMLService.mlflow_tracking_uri = 'http://127.0.0.1:9'\n" + config)
    env = {key: v for key, v in os.environ.items() if not key.startswith(("JUPYTERHUB_", "MLFLOW_"))}
    env["JUPYTERHUB_API_TOKEN"] = "x"
    result = subprocess.run([sys.executable, "-m", "hubml.hub_ext", f"--config={cfg}"], capture_output=True,
                            text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert fragment in result.stdout + result.stderr, result.stdout + result.stderr


async def test_explicit_trainjob_flavour_without_rights_stops_the_service(kube_cluster, tmp_path):
    """The CRD is served but the ServiceAccount may not use it: the service says so at startup."""
    from hubml_testing.kube import service_account_kubeconfig

    api = kube_cluster.api_client()
    kube = k.Kube(api)
    ns = f"hubml-norights-{os.getpid() % 10000}"
    try:
        await kube.request("POST", "/api/v1/namespaces",
                           body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        await kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
                           body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "hubml"}})
        role = rbac.service_rbac(ns)[0]
        role["rules"] = [r for r in role["rules"] if r["apiGroups"] != ["trainer.kubeflow.org"]]
        await kube.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", body=role)
        await kube.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
                           body=rbac.service_rbac(ns)[1])
        kubeconfig = await service_account_kubeconfig(kube_cluster, api, ns, "hubml", tmp_path / "kubeconfig")
        cfg = tmp_path / "cfg.py"
        cfg.write_text("\n".join(["c = get_config()  # noqa", f"c.HubMLService.namespace = {ns!r}",
                                  f"c.HubMLService.kubeconfig = {str(kubeconfig)!r}",
                                  "c.HubMLService.mlflow_tracking_uri = 'http://127.0.0.1:9'",
                                  "c.HubMLService.training_flavour = 'trainjob'",
                                  "c.HubMLService.use_informers = False"]) + "\n")
        env = {key: v for key, v in os.environ.items() if not key.startswith(("JUPYTERHUB_", "MLFLOW_"))}
        env["JUPYTERHUB_API_TOKEN"] = "x"
        result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "hubml.hub_ext", f"--config={cfg}"],
                                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        out = result.stdout + result.stderr
        assert result.returncode != 0 and "may not list trainjobs.trainer.kubeflow.org" in out, out
    finally:
        try:
            await kube.request("DELETE", f"/api/v1/namespaces/{ns}")
        finally:
            await api.close()
