"""The hub service end to end: real JupyterHub + proxy, the service process with a least-privilege
ServiceAccount, the test control plane (kwok nodes) and an MLflow server."""

from __future__ import annotations

import asyncio

import pytest

from hubml.hub_ext import kube as k
from hubml.hub_ext import ownership, training_objects
from hubml_testing.kube import set_pod_outcome, wait_for

from .conftest import assert_only_owner_sees, wait_job_state

pytestmark = [pytest.mark.kube, pytest.mark.hub, pytest.mark.slow]

CODE = "import torch.distributed as dist\nprint('hello from a worker')\n"


async def _pods(svc, job_id):
    return await svc.kube.list(k.POD, svc.namespace, labels={ownership.LABEL_JOB: job_id})


async def _wait_running(svc, job_id, workers):
    async def ready():
        pods = await _pods(svc, job_id)
        return pods if len(pods) == workers and all(p["status"].get("phase") == "Running" for p in pods) else None

    return await wait_for(ready, timeout=60, what=f"{workers} Running pods of {job_id}")


async def test_openapi_document_matches_routes(hub_service):
    from hubml.hub_ext import handlers

    status, doc = hub_service.call("GET", "/openapi.json", token="")
    assert status == 200 and doc["openapi"] == "3.0.3"
    assert doc["servers"][0]["url"] == "/services/hubml/api/v1"
    import re

    patterns = [re.compile(p + "$") for p, _ in handlers.routes("/services/hubml/")]
    for path in doc["paths"]:
        concrete = "/services/hubml/api/v1" + re.sub(r"\{[^}]+\}", "x", path)
        assert any(p.match(concrete) for p in patterns), path
    # and every route but the document itself is documented (one route may serve several paths:
    # /deployments/{name}/promote and /rollback)
    concrete_paths = ["/services/hubml/api/v1" + re.sub(r"\{[^}]+\}", "x", path) for path in doc["paths"]]
    undocumented = [p.pattern for p in patterns
                    if "openapi" not in p.pattern and not any(p.match(c) for c in concrete_paths)]
    assert undocumented == [], undocumented


async def test_authentication_and_scopes(hub_service):
    status, body = hub_service.call("GET", "/jobs", token="")
    assert status == 401 and "No token" in body["error"]
    status, body = hub_service.call("GET", "/jobs", token="not-a-token")
    assert status == 401 and "does not recognise" in body["error"]
    status, body = hub_service.call("GET", "/jobs", user="alice-noscope")
    assert status == 403 and "custom:hubml:jobs" in body["error"]
    status, body = hub_service.call("GET", "/", user="alice")
    assert status == 200 and body["user"] == "alice" and body["training"] == "job"
    status, body = hub_service.call("GET", "/nope", user="alice")
    assert status == 404 and "error" in body


async def test_profiles_with_availability_and_groups(hub_service):
    status, alice = hub_service.call("GET", "/profiles", user="alice")
    assert status == 200
    by_name = {p["name"]: p for p in alice}
    assert "team-only" in by_name  # alice is in ml-team
    # 2 A100 nodes x 8 GPUs, profile a100 asks 2 per pod
    assert by_name["a100"]["total"] == 16 and by_name["a100"]["available"] <= 8
    assert by_name["cpu"]["available"] is None
    status, bob = hub_service.call("GET", "/profiles", user="bob")
    assert status == 200 and "team-only" not in {p["name"] for p in bob}


BAD_JOBS = [
    (b"not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"workers": 2}', "'code' is a required property"),
    (b'{"code": "x", "workers": 0}', "Invalid workers"),
    (b'{"code": "x", "workers": "2"}', "Invalid workers"),
    (b'{"code": "x", "env": ["A=1"]}', "Invalid env"),
    (b'{"code": "x", "env": {"RANK": "3"}}', "cannot be overridden"),
    (b'{"code": "x", "env": {"A B": "3"}}', "not a valid environment variable"),
    (b'{"code": "x", "namespace": "kube-system"}', "Additional properties"),
    (b'{"code": "x", "profile": "../etc"}', "Invalid profile"),
    (b'{"code": "x", "profile": "nope"}', "unknown profile"),
    (b'{"code": "x", "gpus_per_worker": 1}', "needs a GPU profile"),
    (b'{"code": "x", "profile": "a100", "gpus_per_worker": 4}', "more than profile"),
    (b'{"code": "x", "timeout": -5}', "Invalid timeout"),
    (b'{"code": "   "}', "cell is empty"),
    (b'{"code": "x", "image": "evil.example/miner:1"}', "allow-list"),
]


@pytest.mark.parametrize("raw, fragment", BAD_JOBS)
async def test_bad_job_requests_are_refused_and_create_nothing(hub_service, raw, fragment):
    status, body = hub_service.call("POST", "/jobs", raw=raw, user="carol")
    assert status in (400, 403), body
    assert fragment in body["error"]
    assert await hub_service.kube.list(k.JOB, hub_service.namespace,
                                       labels={ownership.LABEL_USER: "carol"}) == []
    assert await hub_service.kube.list(k.CONFIG_MAP, hub_service.namespace,
                                       labels={ownership.LABEL_USER: "carol"}) == []


async def test_cell_with_a_syntax_error_is_refused_before_any_object_or_run(hub_service, mlflow_server):
    from uuid import uuid4

    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    experiment, run_name = f"syntax-{uuid4().hex[:8]}", f"typo-{uuid4().hex[:8]}"
    body = {"code": "import torch\nfor step in range(3)\n    print(step)\n", "workers": 2,
            "experiment": experiment, "run_name": run_name}
    status, answer = hub_service.call("POST", "/jobs", body, user="carol")
    assert status == 400, answer
    assert ("not valid Python: line 2, column 21 (`for step in range(3)`): expected ':'. Each worker runs the cell "
            "as a standalone Python script") in answer["error"]
    for res in (k.JOB, k.CONFIG_MAP, k.SERVICE, k.NETWORK_POLICY, k.POD):
        assert await hub_service.kube.list(res, hub_service.namespace, labels={ownership.LABEL_USER: "carol"}) == []
    client = MlflowClient(mlflow_server.url)
    assert client.get_experiment_by_name(experiment) is None
    every = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    assert client.search_runs(every, f"attributes.run_name = '{run_name}'", run_view_type=ViewType.ALL) == []


async def test_job_lifecycle_failure_and_isolation(hub_service):
    svc = hub_service
    status, job = svc.call("POST", "/jobs", {"code": CODE, "workers": 3, "env": {"LR": "0.1"},
                                             "experiment": "hub-ext-tests", "run_name": "lifecycle"})
    assert status == 201, job
    job_id = job["id"]
    assert job["state"] == "pending" and job["workers"] == 3 and job["run_id"]

    # the objects the API server accepted, with the expected shape
    kjob = await svc.kube.get(k.JOB, svc.namespace, job_id)
    assert kjob["spec"]["completionMode"] == "Indexed" and kjob["spec"]["suspend"] is False
    cmd = kjob["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == f"{job_id}-0.{job_id}:29400"
    env = {e["name"]: e.get("value") for e in kjob["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_RUN_ID"] == job["run_id"] and env["LR"] == "0.1"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"  # a CPU job sees none of a GPU node's devices
    uid = kjob["metadata"]["uid"]
    for res, name in ((k.SERVICE, job_id), (k.CONFIG_MAP, f"{job_id}-code"), (k.NETWORK_POLICY, job_id)):
        obj = await svc.kube.get(res, svc.namespace, name)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
        assert obj["metadata"]["labels"][ownership.LABEL_USER] == "alice"
    cm = await svc.kube.get(k.CONFIG_MAP, svc.namespace, f"{job_id}-code")
    assert cm["data"]["train.py"] == CODE

    pods = await _wait_running(svc, job_id, 3)
    assert sorted(p["spec"]["hostname"] for p in pods) == [f"{job_id}-{i}" for i in range(3)]
    assert all(p["spec"]["subdomain"] == job_id for p in pods)
    assert all({e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}["NVIDIA_VISIBLE_DEVICES"]
               == "void" for p in pods)
    await wait_job_state(svc, job_id, "running")

    # another user sees nothing of it
    assert_only_owner_sees(svc, job_id)
    status, metrics = svc.call("GET", f"/runs/{job['run_id']}/metrics", user="bob")
    assert status == 403
    status, metrics = svc.call("GET", f"/runs/{job['run_id']}/metrics", user="alice")
    assert status == 200 and metrics == {}

    # logs answer with a cursor even when the simulated kubelet has none
    status, chunk = svc.call("GET", f"/jobs/{job_id}/logs?cursor=&wait=0")
    assert status == 200 and chunk["state"] == "running" and isinstance(chunk["next_cursor"], str)
    status, body = svc.call("GET", f"/jobs/{job_id}/logs?cursor=garbage")
    assert status == 400 and "cursor" in body["error"]
    status, body = svc.call("GET", f"/jobs/{job_id}/logs?wait=99")
    assert status == 400 and "wait" in body["error"]

    # worker 1 fails: the job fails, naming the rank and exit code
    rank1 = next(p for p in pods if p["metadata"]["labels"][ownership.COMPLETION_INDEX_LABEL] == "1")
    await set_pod_outcome(svc.api, svc.namespace, rank1["metadata"]["name"], "fail", exit_code=3)
    failed = await wait_job_state(svc, job_id, "failed")
    assert failed["failed_rank"] == 1 and failed["exit_code"] == 3
    assert "Worker 1 exited with code 3" in failed["message"]
    status, again = svc.call("POST", f"/jobs/{job_id}/cancel")
    assert status == 200 and again["state"] == "failed"  # cancel is idempotent on a finished job


async def test_cancel_stops_every_worker(hub_service):
    svc = hub_service
    status, job = svc.call("POST", "/jobs", {"code": CODE, "workers": 2})
    assert status == 201, job
    await _wait_running(svc, job["id"], 2)
    status, cancelled = svc.call("POST", f"/jobs/{job['id']}/cancel")
    assert status == 200 and cancelled["state"] == "cancelled"

    async def pods_gone():
        return await _pods(svc, job["id"]) == []

    await wait_for(pods_gone, timeout=60, what="the cancelled job's pods to stop")
    status, listed = svc.call("GET", "/jobs")
    assert {j["id"]: j["state"] for j in listed}[job["id"]] == "cancelled"


async def test_quota_refuses_too_many_gpus(hub_service):
    status, body = hub_service.call("POST", "/jobs", {"code": CODE, "workers": 5, "profile": "a100"}, user="bob")
    assert status == 403 and "limit per user is 8" in body["error"]
    status, body = hub_service.call("POST", "/jobs", {"code": CODE, "profile": "team-only"}, user="bob")
    assert status == 403 and "reserved for the group" in body["error"]


def _kernel_env(svc, user="alice"):
    return {"JUPYTERHUB_API_TOKEN": svc.tokens[user], "JUPYTERHUB_API_URL": svc.hub.api_url,
            "HUBML_SERVICE_URL": svc.url, "JUPYTERHUB_USER": user}


async def test_train_magic_from_a_kernel_on_the_hub_backend(hub_service, kernel_factory):
    """From a real kernel: %%train picks the hub backend by itself, the objects exist, kwok's state changes
    show in %train_status, and a worker that fails ends the waiting cell with the rank and exit code."""
    svc = hub_service
    kernel = await asyncio.to_thread(kernel_factory, extra_env=_kernel_env(svc))
    res = await asyncio.to_thread(kernel.run_ok, "from hubml.magics.session import detect_backend\n"
                                                 "print(detect_backend())")
    assert res.stdout.strip() == "hub"

    res = await asyncio.to_thread(kernel.run_ok, "%%train --workers 2 --no-wait\nprint('hi')\n")
    ours = {j["id"] for j in svc.call("GET", "/jobs")[1] if j["state"] == "pending" or j["state"] == "running"}
    job_id = next(j for j in ours if j in res.text)
    kjob = await svc.kube.get(k.JOB, svc.namespace, job_id)
    assert kjob["spec"]["completions"] == 2
    pods = await _wait_running(svc, job_id, 2)
    await wait_job_state(svc, job_id, "running")
    res = await asyncio.to_thread(kernel.run_ok, f"%train_status {job_id}")
    assert "running" in res.text
    for pod in pods:
        await set_pod_outcome(svc.api, svc.namespace, pod["metadata"]["name"], "succeed")
    await wait_job_state(svc, job_id, "succeeded")
    res = await asyncio.to_thread(kernel.run_ok, f"%train_status {job_id}")
    assert "succeeded" in res.text
    res = await asyncio.to_thread(kernel.run_ok, "%jobs")
    assert job_id in res.text

    # a waiting %%train cell: worker 1 fails while the cell runs
    async def fail_rank_1():
        async def started():
            jobs = [j for j in (await asyncio.to_thread(svc.call, "GET", "/jobs"))[1] if j["state"] == "running"]
            return jobs[0]["id"] if jobs else None

        running = await wait_for(started, timeout=60, what="the waiting cell's job to run")
        pods = await _wait_running(svc, running, 2)
        rank1 = next(p for p in pods if p["metadata"]["labels"][ownership.COMPLETION_INDEX_LABEL] == "1")
        await set_pod_outcome(svc.api, svc.namespace, rank1["metadata"]["name"], "fail", exit_code=7)
        return running

    cell = asyncio.create_task(asyncio.to_thread(kernel.run, "%%train --workers 2\nprint('hi')\n", timeout=120))
    failed_id = await fail_rank_1()
    res = await cell
    assert res.status == "error" and res.ename == "JobFailed", res.error_text
    assert failed_id in res.error_text and "Worker 1 exited with code 7" in res.error_text

    # reattach after a kernel restart: the jobs are still listed
    await asyncio.to_thread(kernel.restart)
    res = await asyncio.to_thread(kernel.run_ok, "%jobs --backend hub")
    assert job_id in res.text and failed_id in res.text


async def test_pytorchjob_alternative_is_accepted_and_crds_are_detected(hub_service, kube_cluster, policy):
    """Where the Kubeflow CRD is installed the PyTorchJob form passes its schema; detection follows the CRDs."""
    from hubml.hub_ext import policy as pol
    from hubml.jobs import TrainSpec

    svc = hub_service
    plan = pol.plan_training(policy, pol.Caller("alice"), TrainSpec(code=CODE, workers=3, profile="a100"),
                             job_id="train-pj0123456", mlflow_env={"MLFLOW_RUN_ID": "r"}, record={"workers": 3})
    manifest = training_objects.pytorch_job(plan)
    manifest["metadata"]["namespace"] = svc.namespace
    accepted = await svc.kube.create(manifest, dry_run=True)
    assert accepted["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert (await k.detect_crds(svc.kube)) == {"PyTorchJob": True, "TrainJob": True, "InferenceService": True}
    with kube_cluster.without_crds("pytorchjob"):
        assert (await k.detect_crds(svc.kube))["PyTorchJob"] is False
        with pytest.raises(k.NotFound):
            await svc.kube.create(manifest, dry_run=True)
