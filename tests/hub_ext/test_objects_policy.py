"""Pure manifest builders and policy: shapes, validation corpus, ownership, quotas."""

from __future__ import annotations

import json

from dataclasses import replace

import pytest

from hubml.errors import Forbidden, InvalidRequest, NotFound
from hubml.hub_ext import ownership, serving_objects, training_objects, policy as pol
from hubml.jobs import JobState, JobStatus, TrainSpec
from hubml.models import DeploySpec, ModelRef

ALICE = pol.Caller("alice", ("ml-team",))
BOB = pol.Caller("bob", ())


def _plan(policy, caller=ALICE, **spec_kw):
    spec = TrainSpec(code="print('hi')\n", **spec_kw)
    return pol.plan_training(policy, caller, spec, job_id="train-0123456789",
                             mlflow_env={"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_RUN_ID": "abc"},
                             record={"workers": spec.workers, "run_id": "abc", "created": 1.0})


def test_indexed_job_shape(policy):
    plan = _plan(policy, workers=4, profile="a100", gpus_per_worker=2, env={"LR": "0.1"}, timeout=600)
    job = training_objects.indexed_job(plan)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["suspend"] is False and spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 600
    assert spec["ttlSecondsAfterFinished"] == 7 * 86400
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "train-0123456789" and pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    c = pod["containers"][0]
    cmd = c["command"]
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nnodes") + 1] == "4" and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "train-0123456789-0.train-0123456789:29400"
    assert cmd[cmd.index("--node-rank") + 1] == "$(NODE_RANK)"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")
    assert env["LR"]["value"] == "0.1" and env["MLFLOW_RUN_ID"]["value"] == "abc"
    assert env["HUBML_JOB_ID"]["value"] == "train-0123456789"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2" and c["resources"]["requests"]["cpu"] == "4"
    assert "NVIDIA_VISIBLE_DEVICES" not in env  # the device plugin sets it for the GPUs it gives
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    labels = job["metadata"]["labels"]
    assert labels[ownership.LABEL_USER] == "alice" and labels[ownership.LABEL_KIND] == "training"
    assert labels[ownership.LABEL_JOB] == "train-0123456789"
    tpl_labels = spec["template"]["metadata"]["labels"]
    assert tpl_labels[ownership.LABEL_JOB] == "train-0123456789" and tpl_labels["hubml.io/profile"] == "a100"
    record = json.loads(job["metadata"]["annotations"][ownership.ANNOTATION_SPEC])
    assert record["gpus_per_worker"] == 2 and record["profile"] == "a100"


@pytest.mark.parametrize("profile", [None, "cpu"])
def test_cpu_workers_and_model_servers_see_no_gpu(policy, profile):
    job = training_objects.indexed_job(_plan(policy, workers=2, profile=profile))
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert not any(k.startswith("nvidia.com/") for k in job["spec"]["template"]["spec"]["containers"][0]
                   ["resources"].get("limits", {}))
    plan = pol.plan_serving(policy, ALICE, DeploySpec(name="clf", model=ModelRef.parse("m/1"), profile=profile),
                            version=1, storage_uri="models:/m/1", kserve=False, env={"MLFLOW_TRACKING_URI": "http://m"})
    served = serving_objects.scoring_deployment(plan)["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in served["env"]}["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_dependants_are_owned_and_scoped(policy):
    plan = _plan(policy, workers=2)
    owner = ownership.owner_reference({"apiVersion": "batch/v1", "kind": "Job",
                                     "metadata": {"name": plan.job_id, "uid": "u-1"}})
    svc = training_objects.rendezvous_service(plan, owner)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"][ownership.LABEL_JOB] == plan.job_id
    cm = training_objects.code_config_map(plan, owner)
    assert cm["data"]["train.py"] == "print('hi')\n" and cm["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    np_ = training_objects.training_network_policy(plan, training_objects.mlflow_egress_from_uri("http://mlflow.ml:5000"), owner)
    assert np_["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ports = [p for rule in np_["spec"]["egress"] for p in rule.get("ports", [])]
    assert {"protocol": "TCP", "port": 5000} in ports and {"protocol": "UDP", "port": 53} in ports
    # nothing else: every egress rule names peers (no rule without "to" = no open egress)
    assert all(rule.get("to") for rule in np_["spec"]["egress"])


def test_pytorch_job_shape(policy):
    plan = _plan(policy, workers=3)
    pj = training_objects.pytorch_job(plan)
    reps = pj["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 2
    assert reps["Master"]["template"]["spec"]["containers"][0]["name"] == "pytorch"
    assert pj["spec"]["runPolicy"]["suspend"] is False


def test_mig_and_shared_profiles(policy):
    mig = _plan(policy, profile="mig-small")
    c = training_objects.indexed_job(mig)["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/mig-1g.10gb"] == "1"
    assert training_objects.indexed_job(mig)["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/mig.strategy"] == "mixed"
    shared = _plan(policy, profile="t4-shared")
    assert shared.nproc_per_node == 1


def test_user_slug_is_label_safe_and_distinct():
    a = ownership.user_slug("a@example.org")
    b = ownership.user_slug("a-example.org")
    assert a != b and len(a) <= 63
    assert ownership.user_slug("alice") == "alice"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"profile": "nope"}, "unknown profile"),
    ({"gpus_per_worker": 1}, "needs a GPU profile"),
    ({"profile": "a100", "gpus_per_worker": 3}, "more than profile 'a100'"),
    ({"workers": 0}, "--workers"),
    ({"env": {"RANK": "1"}}, "cannot be overridden"),
    ({"env": {"1X": "1"}}, "not a valid environment"),
    ({"profile": "Bad_Name"}, "not a valid name"),
    ({"timeout": -1}, "--timeout"),
])
def test_training_bad_input(policy, kwargs, fragment):
    with pytest.raises(InvalidRequest, match=fragment):
        _plan(policy, **kwargs)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"workers": 17}, "more than this hub allows"),
    ({"profile": "team-only"}, "reserved for the group"),
])
def test_training_forbidden(policy, kwargs, fragment):
    with pytest.raises(Forbidden, match=fragment):
        _plan(policy, BOB, **kwargs)


def test_quota_counts_running_jobs(policy):
    running = [JobStatus(id=f"j{i}", state=JobState.RUNNING, workers=2, backend="hub", created=0,
                         gpus_per_worker=2) for i in range(2)]
    pol.check_quota(policy, ALICE, 1, 0, running)  # 8 held, CPU job fine
    with pytest.raises(Forbidden, match="limit per user is 8"):
        pol.check_quota(policy, ALICE, 1, 2, running)
    running.append(JobStatus(id="j9", state=JobState.PENDING, workers=1, backend="hub", created=0))
    with pytest.raises(Forbidden, match="unfinished job"):
        pol.check_quota(policy, ALICE, 1, 0, running)
    done = [JobStatus(id="d", state=JobState.SUCCEEDED, workers=8, backend="hub", created=0, gpus_per_worker=8)]
    pol.check_quota(policy, ALICE, 1, 8, done)


def test_image_allow_list(policy, catalogue):
    team = catalogue.get("team-only")
    assert pol.choose_image(policy, team, None) == "quay.io/hubml/torch:2.15"
    assert pol.choose_image(policy, None, None) == "quay.io/hubml/runtime:1"
    assert pol.choose_image(policy, None, "registry.example.org/ml/x:1") == "registry.example.org/ml/x:1"
    with pytest.raises(Forbidden, match="allow-list"):
        pol.choose_image(policy, team, "docker.io/evil/miner:latest")
    with pytest.raises(InvalidRequest, match="image reference"):
        pol.choose_image(policy, team, "bad image; rm -rf /")
    with pytest.raises(ValueError, match="anchored"):
        pol.Policy(namespace="x", catalogue=catalogue, default_image="a", serving_image="b",
                   allowed_images=("registry.example.org/.*",))


def test_ownership():
    obj = {"metadata": {"labels": {ownership.LABEL_MANAGED_BY: "hubml", ownership.LABEL_USER: "alice"},
                        "annotations": {ownership.ANNOTATION_USERNAME: "alice"}}}
    assert pol.require_owner(obj, ALICE, "Job", "x") is obj
    with pytest.raises(Forbidden):
        pol.require_owner(obj, BOB, "Job", "x")
    with pytest.raises(NotFound):
        pol.require_owner(None, ALICE, "Job", "x")
    foreign = {"metadata": {"labels": {ownership.LABEL_USER: "alice"}}}
    with pytest.raises(NotFound):
        pol.require_owner(foreign, ALICE, "Job", "x")
    # a label alone (forged slug) is not enough: the exact name must match too
    forged = {"metadata": {"labels": {ownership.LABEL_MANAGED_BY: "hubml", ownership.LABEL_USER: "alice"},
                           "annotations": {ownership.ANNOTATION_USERNAME: "alice2"}}}
    with pytest.raises(Forbidden):
        pol.require_owner(forged, ALICE, "Job", "x")


def _serving(policy, kserve=True, **kw):
    spec = DeploySpec(model=ModelRef.parse("iris-clf@champion"), name=kw.pop("name", "iris"), **kw)
    return pol.plan_serving(policy, ALICE, spec, version=3, storage_uri="s3://mlflow/1/models/m/artifacts",
                            kserve=kserve, env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
                            existing=["iris"])


def test_inference_service_shape(policy):
    plan = replace(_serving(policy, min_replicas=1, max_replicas=3), runtime="hubml-mlflow")
    isvc = serving_objects.inference_service(plan)
    pred = isvc["spec"]["predictor"]
    assert {k: pred["model"][k] for k in ("modelFormat", "runtime", "storageUri")} == {
        "modelFormat": {"name": "mlflow"}, "runtime": "hubml-mlflow", "storageUri": "s3://mlflow/1/models/m/artifacts"}
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in pred["model"]["env"]
    assert "protocolVersion" not in pred["model"]
    assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 3) and "canaryTrafficPercent" not in pred
    assert isvc["metadata"]["labels"][ownership.LABEL_DEPLOYMENT] == "iris"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    # without hubml's runtime KServe picks its own for mlflow (MLServer), which speaks protocol v2
    pred = serving_objects.inference_service(replace(plan, runtime=""))["spec"]["predictor"]
    assert pred["model"]["protocolVersion"] == "v2" and "runtime" not in pred["model"]
    for bad in ("mlflow-artifacts:/1/m", "file:///srv/mlflow/1", "models:/iris/3"):
        with pytest.raises(InvalidRequest, match="storage initializer"):
            serving_objects.inference_service(replace(plan, storage_uri=bad))


def test_scoring_trio_shape(policy):
    plan = _serving(policy, kserve=False, min_replicas=0, max_replicas=4)
    dep, svc, hpa = serving_objects.scoring_deployment(plan), serving_objects.scoring_service(plan), serving_objects.scoring_hpa(plan)
    assert dep["spec"]["replicas"] == 1
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["mlflow", "models", "serve"] and "models:/iris-clf/3" in cmd
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert hpa["apiVersion"] == "autoscaling/v2" and (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)


@pytest.mark.parametrize("kw, kserve, err, fragment", [
    ({"canary_percent": 10}, False, InvalidRequest, "needs KServe"),
    ({"canary_percent": 10, "name": "new-one"}, True, InvalidRequest, "you have no deployment 'new-one'"),
    ({"name": "x" * 50}, True, InvalidRequest, "at most 45"),
    ({"name": "Bad"}, True, InvalidRequest, "not a valid name"),
    ({"min_replicas": 3, "max_replicas": 2}, True, InvalidRequest, "--max-replicas"),
    ({"profile": "team-only"}, True, None, None),
])
def test_serving_bad_input(policy, kw, kserve, err, fragment):
    if err is None:
        assert _serving(policy, kserve=kserve, **kw).resources["limits"]["nvidia.com/gpu"] == "1"
        return
    with pytest.raises(err, match=fragment):
        _serving(policy, kserve=kserve, **kw)


def test_serving_plan_rejects_bad_storage_uri(policy):
    plan = _serving(policy)
    with pytest.raises(InvalidRequest, match="storageUri"):
        replace(plan, storage_uri="models:/iris/3; rm").validate()


def _pod(rank, phase, code=None, ts="2026-01-01T00:00:00Z", finished=None):
    status = {"phase": phase}
    if code is not None:
        term = {"exitCode": code, **({"finishedAt": finished} if finished else {})}
        status["containerStatuses"] = [{"name": "worker", "state": {"terminated": term}}]
    return {"metadata": {"name": f"train-1-{rank}", "labels": {ownership.COMPLETION_INDEX_LABEL: str(rank)},
                         "creationTimestamp": ts},
            "status": status}


def _job(**extra):
    job = {"metadata": {"name": "train-1", "creationTimestamp": "2026-01-01T00:00:00Z",
                        "annotations": {ownership.ANNOTATION_SPEC: json.dumps({"workers": 3, "run_id": "r"})}},
           "status": {}}
    job["metadata"]["annotations"].update(extra.pop("annotations", {}))
    job["status"].update(extra)
    return job


def test_job_status_from_pods():
    st = pol.job_status(_job(), [_pod(0, "Running"), _pod(1, "Running")])
    assert st.state is JobState.PENDING and [w.state for w in st.worker_states][2] is JobState.PENDING
    st = pol.job_status(_job(startTime="2026-01-01T00:00:05Z"), [_pod(i, "Running") for i in range(3)])
    assert st.state is JobState.RUNNING and st.started is not None and st.run_id == "r"
    st = pol.job_status(_job(), [_pod(0, "Running"), _pod(1, "Failed", 3), _pod(2, "Running")])
    assert (st.state, st.failed_rank, st.exit_code) == (JobState.FAILED, 1, 3)
    assert "Worker 1 exited with code 3" in st.message
    done = _job(conditions=[{"type": "Complete", "status": "True"}], completionTime="2026-01-01T00:01:00Z")
    st = pol.job_status(done, [_pod(i, "Succeeded", 0) for i in range(3)])
    assert st.state is JobState.SUCCEEDED and st.finished is not None
    st = pol.job_status(_job(annotations={ownership.ANNOTATION_CANCELLED: "2026-01-01T00:02:00Z"}), [])
    assert st.state is JobState.CANCELLED and st.finished is not None
    # a replacement pod (newer) wins over the failed one of the same rank
    st = pol.job_status(_job(), [_pod(0, "Failed", 1, "2026-01-01T00:00:00Z"),
                                 _pod(0, "Running", None, "2026-01-01T00:00:09Z")])
    assert st.worker_states[0].state is JobState.RUNNING


def test_job_status_names_the_rank_that_failed_first_not_the_lowest():
    """Rank 1 raises; rank 0's next collective fails ("Connection closed by peer") 0.6 s
    later, within the same second of ``finishedAt``: the cause is rank 1."""
    both = [_pod(0, "Failed", 1, finished="2026-01-01T00:00:07Z"), _pod(1, "Failed", 1, finished="2026-01-01T00:00:07Z")]
    assert pol.failed_pods(both + [_pod(2, "Running")]) == {0: "train-1-0", 1: "train-1-1"}
    t = 1_767_225_607 * 10**9  # 2026-01-01T00:00:07Z in ns
    st = pol.job_status(_job(), both, failed_at={0: t + 640_000_000, 1: t + 30_000_000})
    assert (st.failed_rank, st.exit_code) == (1, 1) and "Worker 1 exited with code 1" in st.message
    # without log times, finishedAt orders them (whole seconds), then the lowest rank
    later0 = [_pod(0, "Failed", 1, finished="2026-01-01T00:00:09Z"), _pod(1, "Failed", 2, finished="2026-01-01T00:00:07Z")]
    assert pol.job_status(_job(), later0).failed_rank == 1
    assert pol.job_status(_job(), both).failed_rank == 0
    # a rank stopped from outside (SIGTERM: 143) is a consequence even when it ended first
    stopped = [_pod(0, "Failed", 143, finished="2026-01-01T00:00:05Z"), _pod(1, "Failed", 1, finished="2026-01-01T00:00:07Z")]
    assert pol.job_status(_job(), stopped).failed_rank == 1
