"""The Kubeflow Trainer ``TrainJob`` flavour without a cluster: manifest shape per profile, refusals,
status mapping from the Trainer's conditions, flavour choice, and the RBAC it needs."""

from __future__ import annotations

import time

import pytest

from hubml.errors import InvalidRequest
from hubml.hub_ext import rbac, training_objects
from hubml.hub_ext import policy as pol
from hubml.hub_ext.training import CrdCache, Training
from hubml.jobs import JobState, TrainSpec
from hubml.profile_config import load_catalogue

CODE = "import torch\nprint(torch.__version__)\n"

#: like tests/hub_ext/conftest.PROFILES, with the GPU model pinned by an exact node selector
#: (what a Trainer v2.0 podSpecOverride can carry; see training_objects.trainjob_node_selector)
PINNED_PROFILES = [
    {"name": "cpu", "display": "CPU", "cpu": 1, "memory": "1G", "default": True},
    {"name": "a100", "display": "2 x A100", "gpu": {"model": "A100-SXM4-80GB", "count": 2}, "cpu": 4,
     "memory": "8G", "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}},
    {"name": "mig-small", "display": "A100 MIG 1g.10gb", "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.10gb"},
     "cpu": 1, "memory": "2G", "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}},
    {"name": "a100-unpinned", "display": "A100, model by affinity only",
     "gpu": {"model": "A100-SXM4-80GB", "count": 1}},
]


@pytest.fixture
def pinned_policy():
    return pol.Policy(namespace="hubml-jobs", catalogue=load_catalogue(PINNED_PROFILES),
                      default_image="quay.io/hubml/runtime:1", serving_image="quay.io/hubml/serving:1")


def _plan(policy, profile=None, workers=2, env=None, **kw):
    spec = TrainSpec(code=CODE, workers=workers, profile=profile, env=env or {})
    return pol.plan_training(policy, pol.Caller("alice"), spec, job_id="train-0123456789",
                             mlflow_env={"MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000",
                                         "MLFLOW_RUN_ID": "run-1", "MLFLOW_EXPERIMENT_ID": "7"},
                             record={"workers": workers, "run_id": "run-1"}, **kw)


def _env(manifest):
    return {e["name"]: e["value"] for e in manifest["spec"]["trainer"]["env"]}


def test_shape_of_a_cpu_trainjob(pinned_policy):
    plan = _plan(pinned_policy, env={"LR": "0.1"})
    tj = training_objects.train_job(plan)
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and tj["kind"] == "TrainJob"
    meta = tj["metadata"]
    assert meta["name"] == "train-0123456789" and meta["namespace"] == "hubml-jobs"
    assert meta["labels"] == {"hubml.io/user": "alice", "hubml.io/kind": "training",
                              "app.kubernetes.io/managed-by": "hubml", "hubml.io/job": "train-0123456789"}
    assert meta["annotations"]["hubml.io/username"] == "alice"
    assert '"run_id":"run-1"' in meta["annotations"]["hubml.io/spec"]
    spec = tj["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    trainer = spec["trainer"]
    assert trainer["image"] == "quay.io/hubml/runtime:1"
    # the Torch runtime injects PET_NNODES/PET_NODE_RANK/PET_MASTER_ADDR…, which torch.distributed.run reads
    assert trainer["command"] == ["python", "-m", "torch.distributed.run", "/hubml/code/train.py"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 1
    assert trainer["resourcesPerNode"] == {"requests": {"cpu": "1", "memory": "1073741824"},
                                           "limits": {"cpu": "1", "memory": "1073741824"}}
    assert _env(tj) == {"LR": "0.1", "MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000", "MLFLOW_RUN_ID": "run-1",
                        "MLFLOW_EXPERIMENT_ID": "7", "HUBML_JOB_ID": "train-0123456789", "PYTHONUNBUFFERED": "1",
                        "NVIDIA_VISIBLE_DEVICES": "void"}
    # labels and annotations for the JobSet and its Jobs: owner + profile
    assert spec["labels"]["hubml.io/user"] == "alice" and spec["labels"]["hubml.io/profile"] == "cpu"
    assert spec["annotations"]["hubml.io/username"] == "alice"
    (override,) = spec["podSpecOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    volumes = {v["name"]: v for v in override["volumes"]}
    assert volumes["hubml-code"]["configMap"]["name"] == "train-0123456789-code"
    assert volumes["hubml-dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert override["containers"] == [{"name": "node", "volumeMounts": [
        {"name": "hubml-code", "mountPath": "/hubml/code", "readOnly": True},
        {"name": "hubml-dshm", "mountPath": "/dev/shm"}]}]
    assert "nodeSelector" not in override and "tolerations" not in override
    assert spec["suspend"] is False and "activeDeadlineSeconds" not in spec


def test_gpu_profile_resources_selector_and_tolerations(pinned_policy):
    tj = training_objects.train_job(_plan(pinned_policy, "a100", workers=3))
    trainer = tj["spec"]["trainer"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 2  # one process per GPU
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    assert trainer["resourcesPerNode"]["requests"]["nvidia.com/gpu"] == "2"
    (override,) = tj["spec"]["podSpecOverrides"]
    assert override["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert override["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert tj["spec"]["labels"]["hubml.io/gpu-model"] == "A100-SXM4-80GB"


def test_mig_profile_asks_for_the_mig_resource(pinned_policy):
    tj = training_objects.train_job(_plan(pinned_policy, "mig-small", workers=1))
    res = tj["spec"]["trainer"]["resourcesPerNode"]
    assert res["limits"]["nvidia.com/mig-1g.10gb"] == "1" and "nvidia.com/gpu" not in res["limits"]
    assert tj["spec"]["trainer"]["numProcPerNode"] == 1
    assert tj["spec"]["podSpecOverrides"][0]["nodeSelector"] == {
        "nvidia.com/mig.strategy": "mixed", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def test_single_valued_affinity_becomes_a_node_selector(pinned_policy):
    from dataclasses import replace

    plan = replace(_plan(pinned_policy), node_affinity=[{"key": "topology.kubernetes.io/zone", "operator": "In",
                                                          "values": ["eu-west-1a"]}])
    assert training_objects.trainjob_node_selector(plan.node_selector, plan.node_affinity) == {"topology.kubernetes.io/zone": "eu-west-1a"}


def test_runtime_and_deadline_are_configurable(pinned_policy):
    from dataclasses import replace

    plan = replace(_plan(pinned_policy), active_deadline_seconds=600)
    tj = training_objects.train_job(plan, training_objects.TrainerRuntime("hubml-torch", "TrainingRuntime"))
    assert tj["spec"]["runtimeRef"] == {"name": "hubml-torch", "apiGroup": "trainer.kubeflow.org",
                                        "kind": "TrainingRuntime"}
    assert tj["spec"]["activeDeadlineSeconds"] == 600


def test_network_policy_selects_the_jobset_pods(pinned_policy):
    plan = _plan(pinned_policy)
    selector = training_objects.trainjob_pod_selector(plan.job_id)
    assert selector == {"jobset.sigs.k8s.io/jobset-name": "train-0123456789"}
    np = training_objects.training_network_policy(plan, training_objects.mlflow_egress_from_uri("http://mlflow:5000"),
                                         pod_selector=selector)
    assert np["spec"]["podSelector"] == {"matchLabels": selector}
    assert np["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    assert {"to": [{"podSelector": {"matchLabels": selector}}]} in np["spec"]["egress"]
    # the built-in flavours keep selecting on hubml's own label
    assert training_objects.training_network_policy(plan, [])["spec"]["podSelector"] == {
        "matchLabels": {"hubml.io/job": "train-0123456789"}}


# --------------------------------------------------------------------------- refusals


def test_unpinned_gpu_model_is_refused_with_the_fix(pinned_policy):
    plan = _plan(pinned_policy, "a100-unpinned", workers=1)
    with pytest.raises(InvalidRequest) as e:
        training_objects.train_job(plan)
    msg = str(e.value)
    assert "nvidia.com/gpu.product" in msg and "node_selector" in msg and "training_flavour" in msg


def test_conflicting_single_value_is_refused(pinned_policy):
    from dataclasses import replace

    plan = replace(_plan(pinned_policy, "a100"), node_affinity=[
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["Tesla-T4"]}])
    with pytest.raises(InvalidRequest, match="nvidia.com/gpu.product"):
        training_objects.train_job(plan)


@pytest.mark.parametrize("runtime, fragment", [
    (training_objects.TrainerRuntime(""), "not a Kubernetes object name"),
    (training_objects.TrainerRuntime("Torch_Distributed"), "not a Kubernetes object name"),
    (training_objects.TrainerRuntime("x" * 254), "not a Kubernetes object name"),
    (training_objects.TrainerRuntime("a;rm -rf /"), "not a Kubernetes object name"),
    (training_objects.TrainerRuntime("torch-distributed", "Runtime"), "neither of ClusterTrainingRuntime"),
    (training_objects.TrainerRuntime("torch-distributed", "clustertrainingruntime"), "neither of ClusterTrainingRuntime"),
])
def test_bad_runtimes_are_refused(pinned_policy, runtime, fragment):
    with pytest.raises(InvalidRequest, match=fragment):
        training_objects.train_job(_plan(pinned_policy), runtime)


def test_bad_plans_are_refused(pinned_policy):
    from dataclasses import replace

    good = _plan(pinned_policy)
    with pytest.raises(InvalidRequest, match="PET_NNODES"):
        training_objects.train_job(replace(good, env={"PET_NNODES": "4"}))
    with pytest.raises(InvalidRequest, match="at most 128 environment variables"):
        training_objects.train_job(replace(good, env={f"V{i}": "x" for i in range(130)}))
    with pytest.raises(InvalidRequest, match="workers"):
        training_objects.train_job(replace(good, workers=0))
    with pytest.raises(InvalidRequest, match="Image"):
        training_objects.train_job(replace(good, image="bad image; rm"))
    with pytest.raises(InvalidRequest, match="node selector"):
        training_objects.train_job(replace(good, node_selector={"bad key!": "x"}))
    with pytest.raises(InvalidRequest, match="quantity"):
        training_objects.train_job(replace(good, resources={"limits": {"cpu": "lots"}}))
    with pytest.raises(InvalidRequest, match="empty"):
        training_objects.train_job(replace(good, code="  "))


def test_user_env_cannot_shadow_the_service_variables(pinned_policy):
    """One entry per name (the API keys env by name): MLflow's run wins over anything else."""
    from dataclasses import replace

    plan = replace(_plan(pinned_policy), env={"LR": "1"}, system_env={"MLFLOW_RUN_ID": "run-1", "LR": "2"})
    tj = training_objects.train_job(plan)
    names = [e["name"] for e in tj["spec"]["trainer"]["env"]]
    assert len(names) == len(set(names)) and _env(tj)["LR"] == "2"


# --------------------------------------------------------------------------- status


def _cond(kind, status="True", reason="", message="", at="2026-11-24T06:00:00Z"):
    return {"type": kind, "status": status, "reason": reason or kind, "message": message,
            "lastTransitionTime": at}


def _trainjob(status=None, annotations=None, workers=2):
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": "train-0123456789", "creationTimestamp": "2026-11-24T05:59:00Z",
                         "labels": {"hubml.io/user": "alice"},
                         "annotations": {"hubml.io/username": "alice",
                                         "hubml.io/spec": f'{{"workers":{workers},"run_id":"r"}}',
                                         **(annotations or {})}},
            "status": status or {}}


def _pod(rank, phase, exit_code=None):
    state = {"terminated": {"exitCode": exit_code}} if exit_code is not None else {"running": {}}
    return {"metadata": {"name": f"train-0123456789-node-0-{rank}", "creationTimestamp": "2026-11-24T06:00:00Z",
                         "labels": {"jobset.sigs.k8s.io/jobset-name": "train-0123456789",
                                    "batch.kubernetes.io/job-completion-index": str(rank)}},
            "status": {"phase": phase, "containerStatuses": [{"state": state}]}}


def test_status_from_the_trainer_conditions():
    fresh = pol.job_status(_trainjob(), [])
    assert fresh.state is JobState.PENDING and [w.state for w in fresh.worker_states] == [JobState.PENDING] * 2

    suspended = pol.job_status(_trainjob({"conditions": [_cond("Suspended", message="queued by Kueue")]}), [])
    assert suspended.state is JobState.PENDING and "queued by Kueue" in suspended.message

    resumed = pol.job_status(_trainjob({"conditions": [_cond("Suspended", status="False", reason="Resumed")],
                                        "jobsStatus": [{"name": "node", "ready": 1, "active": 1, "succeeded": 0,
                                                        "failed": 0, "suspended": 0}]}), [])
    assert resumed.state is JobState.RUNNING
    assert [w.state for w in resumed.worker_states] == [JobState.RUNNING] * 2

    starting = pol.job_status(_trainjob({"jobsStatus": [{"name": "node", "ready": 0, "active": 1}]}), [])
    assert starting.state is JobState.PENDING

    done = pol.job_status(_trainjob({"conditions": [_cond("Complete", at="2026-11-24T06:10:00Z")]}), [])
    assert done.state is JobState.SUCCEEDED and done.finished == 1795500600.0

    failed = pol.job_status(_trainjob({"conditions": [_cond("Failed", reason="DeadlineExceeded",
                                                            message="TrainJob exceeded its deadline")]}), [])
    assert failed.state is JobState.FAILED and failed.message == "TrainJob exceeded its deadline"
    assert failed.finished is not None

    cancelled = pol.job_status(_trainjob({"conditions": [_cond("Suspended")]},
                                         annotations={"hubml.io/cancelled": "2026-11-24T06:05:00Z"}), [])
    assert cancelled.state is JobState.CANCELLED and cancelled.finished is not None


def test_status_from_the_trainer_pods():
    running = pol.job_status(_trainjob(), [_pod(0, "Running"), _pod(1, "Running")])
    assert running.state is JobState.RUNNING
    one_failed = pol.job_status(_trainjob(), [_pod(0, "Running"), _pod(1, "Failed", exit_code=3)])
    assert one_failed.state is JobState.FAILED and one_failed.failed_rank == 1 and one_failed.exit_code == 3
    assert "Worker 1 exited with code 3" in one_failed.message


# --------------------------------------------------------------------------- flavour and RBAC


def _training(flavour, found):
    crds = CrdCache(kube=None, ttl=1e9)
    crds._found, crds._at = dict(found), time.monotonic()
    return Training(None, None, None, crds, flavour=flavour, mlflow_pod_uri="http://m", mlflow_egress=[])


@pytest.mark.parametrize("flavour, found, expected", [
    ("auto", {"PyTorchJob": True, "TrainJob": True}, "pytorchjob"),
    ("auto", {"PyTorchJob": False, "TrainJob": True}, "trainjob"),
    ("auto", {"PyTorchJob": False, "TrainJob": False}, "job"),
    ("trainjob", {"PyTorchJob": True, "TrainJob": True}, "trainjob"),
    ("job", {"PyTorchJob": True, "TrainJob": True}, "job"),
    ("pytorchjob", {"PyTorchJob": True, "TrainJob": True}, "pytorchjob"),
])
async def test_flavour_order(flavour, found, expected):
    assert await _training(flavour, found).resolved_flavour() == expected


def test_service_rbac_allows_trainjobs_and_nothing_more():
    role = rbac.service_rbac("hubml-jobs")[0]
    rules = [r for r in role["rules"] if r["apiGroups"] == ["trainer.kubeflow.org"]]
    assert rules == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                      "verbs": ["create", "get", "list", "watch", "patch", "delete"]}]
    assert not any("runtimes" in res for r in role["rules"] for res in r["resources"])
