"""`%%train` on the hub backend, for real: the hub service creates the Indexed Job, two pods of
the single-user image start on the real node, rendezvous through the headless Service, train
with DDP (gloo) and rank 0 logs to an MLflow server the pods reach at the node's address; the
cell streams both ranks' lines and ends `succeeded` (issue 11). No pod outcome is set by hand.
The hub service runs from the hub image."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hubml.hub_ext import kube as k
from hubml.hub_ext import ownership
from hubml_testing.kube import wait_for
from hubml_testing.real_pods import REAL_PROFILE, hub_stack
from hubml_testing.train_cells import DDP_CELL, FAILING_CELL, SLEEPY_CELL

_stack = hub_stack()
PROFILES, running_stack = _stack.PROFILES, _stack.running_stack

pytestmark = [pytest.mark.kube, pytest.mark.hub, pytest.mark.node, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
async def real_stack(kube_cluster, singleuser_on_node, in_hub_image, pod_mlflow, tmp_path_factory):
    extra = "\n".join([
        f"c.HubMLService.profiles = {[*PROFILES, REAL_PROFILE]!r}",
        f"c.HubMLService.default_image = {singleuser_on_node!r}",
        "c.HubMLService.extra_pod_annotations = {}",
    ])
    async for svc in running_stack(kube_cluster, pod_mlflow, tmp_path_factory.mktemp("realstack"),
                                   extra_config=extra, launcher=in_hub_image):
        yield svc


def _kernel_env(svc: Any, user: str) -> dict[str, str]:
    return {"JUPYTERHUB_API_TOKEN": svc.tokens[user], "JUPYTERHUB_API_URL": svc.hub.api_url,
            "HUBML_SERVICE_URL": svc.url, "JUPYTERHUB_USER": user}


async def _job_pods(svc: Any, job_id: str) -> list[dict[str, Any]]:
    return await svc.kube.list(k.POD, svc.namespace, labels={ownership.LABEL_JOB: job_id})


async def test_ddp_trains_across_two_real_pods_and_logs_to_mlflow(real_stack, real_node, pod_mlflow, kernel_factory):
    svc = real_stack
    kernel = await asyncio.to_thread(kernel_factory, extra_env=_kernel_env(svc, "alice"))
    res = await asyncio.to_thread(kernel.run, "%%train --workers 2 --profile cpu-real\n" + DDP_CELL, timeout=600)
    assert res.status == "ok", res.text[-4000:]
    out = res.stdout
    assert "[0] world=2 rank-sum=1" in out and "[1] world=2 rank-sum=1" in out, out[-4000:]
    assert "[0] done rank 0" in out and "[1] done rank 1" in out, out[-4000:]
    assert "succeeded" in res.text
    status, jobs = await asyncio.to_thread(svc.call, "GET", "/jobs", user="alice")
    job = jobs[0]
    pods = await _job_pods(svc, job["id"])
    assert {p["spec"]["nodeName"] for p in pods} == {real_node.name}
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pod_mlflow.url)
    run = client.get_run(job["run_id"])
    assert run.data.params["world_size"] == "2"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 8 and losses[-1] < losses[0]


async def test_a_failing_rank_fails_the_cell_naming_rank_and_exit_code(real_stack, kernel_factory):
    svc = real_stack
    kernel = await asyncio.to_thread(kernel_factory, extra_env=_kernel_env(svc, "bob"))
    res = await asyncio.to_thread(kernel.run, "%%train --workers 2 --profile cpu-real\n" + FAILING_CELL, timeout=600)
    assert res.status == "error", res.text[-3000:]
    assert res.ename == "JobFailed", res.evalue
    assert "Worker 1 exited with code 1" in res.evalue, res.evalue
    assert "boom from rank 1" in res.text + res.evalue


async def test_train_cancel_stops_every_real_pod(real_stack, kernel_factory):
    svc = real_stack
    kernel = await asyncio.to_thread(kernel_factory, extra_env=_kernel_env(svc, "carol"))
    await asyncio.to_thread(kernel.run_ok, "%%train --workers 2 --profile cpu-real --no-wait\n" + SLEEPY_CELL)
    status, jobs = await asyncio.to_thread(svc.call, "GET", "/jobs", user="carol")
    job_id = jobs[0]["id"]

    async def running() -> bool:
        pods = await _job_pods(svc, job_id)
        return len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods)

    await wait_for(running, timeout=300, what="both sleepy workers Running on the real node")
    await asyncio.to_thread(kernel.run_ok, f"%train_cancel {job_id}")

    async def gone() -> bool:
        return not await _job_pods(svc, job_id)

    await wait_for(gone, timeout=120, what="every pod of the cancelled job gone")
