"""A worker restarted in a new pod (the Job's ``backoffLimit``): its log starts again from the new
pod's first line, what the old pod showed stays shown, and the restart is announced once.

Its own stack: the service here allows two pod failures per job, so the real
Job controller replaces a failed or deleted worker pod for the same completion
index, as it does in production.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hubml.hub_ext import kube as k
from hubml.hub_ext import ownership
from hubml_testing.kube import set_pod_outcome, wait_for
from hubml_testing.kwok import append_container_log

from .conftest import running_stack
from .test_hub_logs import CODE, LogReader, _running_pods

pytestmark = [pytest.mark.kube, pytest.mark.hub, pytest.mark.slow]


@pytest.fixture(scope="module")
async def retrying_service(kube_cluster, mlflow_server, tmp_path_factory):
    async for svc in running_stack(kube_cluster, mlflow_server, tmp_path_factory.mktemp("hubsvc-retry"),
                                   users=["alice", "bob"], extra_config="c.HubMLService.backoff_limit = 2"):
        yield svc


async def _rank_pods(svc: Any, job_id: str, rank: int) -> list[dict[str, Any]]:
    pods = await svc.kube.list(k.POD, svc.namespace, labels={ownership.LABEL_JOB: job_id})
    return [p for p in pods if p["metadata"]["labels"].get(ownership.COMPLETION_INDEX_LABEL) == str(rank)]


async def _new_running_pod(svc: Any, job_id: str, rank: int, not_uids: set[str]) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        for pod in await _rank_pods(svc, job_id, rank):
            if pod["metadata"]["uid"] not in not_uids and pod["status"].get("phase") == "Running":
                return pod
        return None

    return await wait_for(found, timeout=120, what=f"a new Running pod for rank {rank} of {job_id}")


def _restarted(pod: dict[str, Any]) -> str:
    return f"(worker restarted in a new pod, {pod['metadata']['name']}; its log follows)"


async def test_a_replaced_worker_shows_its_new_pods_log_from_the_first_line(retrying_service, kube_cluster,
                                                                           tmp_path):
    svc = retrying_service
    status, job = svc.call("POST", "/jobs", {"code": CODE, "workers": 2, "run_name": "restarts"})
    assert status == 201, job
    job_id = job["id"]
    pods = await _running_pods(svc, job_id, 2)
    first, second, third = tmp_path / "r1-a.log", tmp_path / "r1-b.log", tmp_path / "r1-c.log"
    append_container_log(tmp_path / "r0.log", ["rank 0 up"])
    append_container_log(first, ["pod a line 1", "pod a line 2"])
    await asyncio.to_thread(kube_cluster.serve_logs, svc.namespace, pods[0]["metadata"]["name"], tmp_path / "r0.log")
    await asyncio.to_thread(kube_cluster.serve_logs, svc.namespace, pods[1]["metadata"]["name"], first)

    reader = LogReader(svc, job_id)
    await reader.until(lambda lines: len(reader.of(1)) == 2 and reader.of(0) == ["rank 0 up"], "both ranks' lines")

    # rank 1's worker writes its last words and fails; the Job controller starts a new pod for index 1
    append_container_log(first, ["pod a last words"])
    await set_pod_outcome(svc.api, svc.namespace, pods[1]["metadata"]["name"], "fail")
    replacement = await _new_running_pod(svc, job_id, 1, {pods[1]["metadata"]["uid"]})
    append_container_log(second, ["pod b line 1", "pod b line 2"])  # the same text a fresh process would print
    await asyncio.to_thread(kube_cluster.serve_logs, svc.namespace, replacement["metadata"]["name"], second)
    await reader.until(lambda lines: reader.of(1)[-1:] == ["pod b line 2"], "the new pod's lines")
    expected = ["pod a line 1", "pod a line 2", "pod a last words", _restarted(replacement),
                "pod b line 1", "pod b line 2"]
    assert reader.of(1) == expected
    assert reader.of(0) == ["rank 0 up"]
    assert reader.state == "running"

    # a fresh reader (a kernel restarted meanwhile) sees both pods of rank 1, in order
    fresh = LogReader(svc, job_id)
    await fresh.until(lambda lines: len(fresh.of(1)) >= len(expected), "the whole of rank 1 from the start")
    assert fresh.of(1) == expected and fresh.of(0) == ["rank 0 up"]

    # the new pod goes on logging; then it is deleted outright (gone from the API, not just failed)
    append_container_log(second, ["pod b line 3"])
    await reader.until(lambda lines: reader.of(1)[-1:] == ["pod b line 3"], "the new pod's next line")
    await svc.kube.delete(k.POD, svc.namespace, replacement["metadata"]["name"])
    later = await _new_running_pod(svc, job_id, 1, {pods[1]["metadata"]["uid"], replacement["metadata"]["uid"]})
    append_container_log(third, ["pod c line 1"])
    await asyncio.to_thread(kube_cluster.serve_logs, svc.namespace, later["metadata"]["name"], third)
    await reader.until(lambda lines: reader.of(1)[-1:] == ["pod c line 1"], "the third pod's line")
    assert reader.of(1) == [*expected, "pod b line 3", _restarted(later), "pod c line 1"]
    assert await reader.poll() == []
    assert reader.of(0) == ["rank 0 up"]

    # the owner only, and the job ends as usual
    status, body = svc.call("GET", f"/jobs/{job_id}/logs", user="bob")
    assert status == 403, body
    status, cancelled = svc.call("POST", f"/jobs/{job_id}/cancel")
    assert status == 200, cancelled
