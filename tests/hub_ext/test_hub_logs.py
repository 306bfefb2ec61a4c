"""Live worker logs of hub-backend training jobs, end to end with real container logs.

Each worker pod's log is a file the test writes (CRI format) and kwok serves
on its kubelet API (``KubeCluster.serve_logs``); the hub service reads it with
its least-privilege ServiceAccount through the real kube-apiserver
(``pods/log``), and the notebook reads the service's logs endpoint. Lines are
appended while the pods run, so "live" is the real thing, not a replay.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from hubml.hub_ext import kube as k
from hubml.hub_ext import log_cursor as lc
from hubml.hub_ext import ownership
from hubml_testing.kube import set_pod_outcome, wait_for
from hubml_testing.kwok import append_container_log

CODE = "print('hello from a worker')\n"


async def _running_pods(svc: Any, job_id: str, workers: int) -> dict[int, dict[str, Any]]:
    """The job's Running pods by rank (completion index)."""
    async def ready() -> dict[int, dict[str, Any]] | None:
        pods = await svc.kube.list(k.POD, svc.namespace, labels={ownership.LABEL_JOB: job_id})
        if len(pods) == workers and all(p["status"].get("phase") == "Running" for p in pods):
            return {int(p["metadata"]["labels"][ownership.COMPLETION_INDEX_LABEL]): p for p in pods}
        return None

    return await wait_for(ready, timeout=60, what=f"{workers} Running pods of {job_id}")


class LogReader:
    """Follows a job through the service's logs endpoint the way the magics do: cursor in, cursor out."""

    def __init__(self, svc: Any, job_id: str, user: str = "alice") -> None:
        self.svc, self.job_id, self.user = svc, job_id, user
        self.cursor = ""
        self.lines: list[tuple[int, str]] = []
        self.state = ""

    async def poll(self, wait: float = 0) -> list[tuple[int, str]]:
        status, chunk = await asyncio.to_thread(
            self.svc.call, "GET", f"/jobs/{self.job_id}/logs?cursor={self.cursor}&wait={wait}", user=self.user)
        assert status == 200, chunk
        new = [(line["rank"], line["text"]) for line in chunk["lines"]]
        self.lines += new
        self.cursor, self.state = chunk["next_cursor"], chunk["state"]
        return new

    async def until(self, done: Callable[[list[tuple[int, str]]], bool], what: str) -> None:
        async def check() -> bool:
            await self.poll(wait=2)
            return done(self.lines)

        await wait_for(check, timeout=60, what=what)

    def of(self, rank: int) -> list[str]:
        return [text for r, text in self.lines if r == rank]


@pytest.mark.parametrize("text, final, lines", [
    ("", False, []),
    ("a\nb\n", False, ["a", "b"]),
    ("a\nhal", False, ["a"]),            # still being written: held back
    ("a\nhal", True, ["a", "hal"]),      # the container ended: it is the last line
    ("a\r\n\nb\n", False, ["a", "", "b"]),
    ("10%\r20%\n", False, ["10%\r20%"]),  # a progress bar is one line, as on the local backend
    ("x\u2028y\x0cz\n", False, ["x\u2028y\x0cz"]),
])
def test_complete_lines_count_only_finished_lines(text: str, final: bool, lines: list[str]) -> None:
    assert lc.complete_lines(text, final) == lines


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_worker_logs_stream_per_rank_while_the_job_runs(hub_service, kube_cluster, tmp_path):
    svc = hub_service
    status, job = svc.call("POST", "/jobs", {"code": CODE, "workers": 2, "run_name": "live-logs"})
    assert status == 201, job
    job_id = job["id"]
    pods = await _running_pods(svc, job_id, 2)
    files = {rank: tmp_path / f"rank{rank}.log" for rank in pods}
    append_container_log(files[0], ["rank 0 starting", "epoch 1 loss=0.9", "progress 10%\rprogress 20%"])
    # rank 1's whole log is one JSON value: it must arrive as written, not as a Python repr
    append_container_log(files[1], ['{"epoch": 1, "loss": 0.25}'])
    for rank, pod in pods.items():
        await asyncio.to_thread(kube_cluster.serve_logs, svc.namespace, pod["metadata"]["name"], files[rank])

    reader = LogReader(svc, job_id)
    await reader.until(lambda lines: len(lines) >= 4, "the first lines of both ranks")
    assert reader.state == "running"
    assert reader.of(0) == ["rank 0 starting", "epoch 1 loss=0.9", "progress 10%\rprogress 20%"]
    assert reader.of(1) == ['{"epoch": 1, "loss": 0.25}']

    # lines written while the job runs arrive, once each, attributed to their rank
    append_container_log(files[0], ["epoch 2 loss=0.7"])
    append_container_log(files[1], ["epoch 2 lo"], partial=True)  # the worker has not ended its line yet
    await reader.until(lambda lines: "epoch 2 loss=0.7" in reader.of(0), "rank 0's second epoch")
    assert await reader.poll() == []
    assert reader.of(1) == ['{"epoch": 1, "loss": 0.25}']  # no half line handed out ...
    append_container_log(files[1], ["ss=0.2"])
    await reader.until(lambda lines: len(reader.of(1)) == 2, "rank 1's completed line")
    assert reader.of(1) == ['{"epoch": 1, "loss": 0.25}', "epoch 2 loss=0.2"]  # ... but the whole one, once

    # a fresh reader (another kernel, after a restart) gets everything from the start
    again = LogReader(svc, job_id)
    await again.until(lambda lines: len(lines) >= 6, "the whole log from the start")
    assert again.of(0) == reader.of(0) and again.of(1) == reader.of(1)

    # the owner only
    status, body = svc.call("GET", f"/jobs/{job_id}/logs", user="bob")
    assert status == 403, body

    # a last line without its newline is delivered once the worker has ended
    append_container_log(files[1], ["bye"], partial=True)
    for pod in pods.values():
        await set_pod_outcome(svc.api, svc.namespace, pod["metadata"]["name"], "succeed")
    await reader.until(lambda lines: reader.state == "succeeded" and reader.of(1)[-1:] == ["bye"],
                       "the job to succeed with rank 1's last line")
    assert reader.of(1) == ['{"epoch": 1, "loss": 0.25}', "epoch 2 loss=0.2", "bye"]
    assert reader.of(0) == ["rank 0 starting", "epoch 1 loss=0.9", "progress 10%\rprogress 20%", "epoch 2 loss=0.7"]
    assert await reader.poll() == []


def _kernel_env(svc: Any, user: str) -> dict[str, str]:
    return {"JUPYTERHUB_API_TOKEN": svc.tokens[user], "JUPYTERHUB_API_URL": svc.hub.api_url,
            "HUBML_SERVICE_URL": svc.url, "JUPYTERHUB_USER": user}


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_train_cell_shows_worker_lines_while_the_job_runs(hub_service, kube_cluster, kernel_factory,
                                                                tmp_path):
    """From a real kernel on the hub backend: a waiting %%train cell prints each worker's lines,
    prefixed with its rank as on the local backend, while the job still runs."""
    svc = hub_service
    kernel = await asyncio.to_thread(kernel_factory, extra_env=_kernel_env(svc, "carol"))
    shown = {"[0] rank 0 epoch 1": threading.Event(), "[1] rank 1 epoch 1": threading.Event(),
             "[0] rank 0 epoch 2": threading.Event()}

    def observe(res: Any) -> bool:  # called by the kernel driver with the output so far; never interrupts
        for text, event in shown.items():
            if text in res.text:
                event.set()
        return False

    cell = asyncio.create_task(asyncio.to_thread(kernel.run, "%%train --workers 2\nprint('hi')\n", timeout=240,
                                                 interrupt_when=observe))
    try:
        async def submitted() -> str | None:
            status, jobs = await asyncio.to_thread(svc.call, "GET", "/jobs", user="carol")
            assert status == 200, jobs
            return jobs[0]["id"] if jobs else None

        job_id = await wait_for(submitted, timeout=120, what="the cell's job")
        pods = await _running_pods(svc, job_id, 2)
        files = {rank: tmp_path / f"k{rank}.log" for rank in pods}
        append_container_log(files[0], ["rank 0 epoch 1"])
        append_container_log(files[1], ["rank 1 epoch 1"])
        for rank, pod in pods.items():
            await asyncio.to_thread(kube_cluster.serve_logs, svc.namespace, pod["metadata"]["name"], files[rank])

        await wait_for(lambda: shown["[0] rank 0 epoch 1"].is_set() and shown["[1] rank 1 epoch 1"].is_set(),
                       timeout=60, what="both ranks' first lines in the cell's output")
        assert not cell.done()  # the pods stay Running until told otherwise: the job still runs
        append_container_log(files[0], ["rank 0 epoch 2"])
        await wait_for(shown["[0] rank 0 epoch 2"].is_set, timeout=60, what="a line written while the cell runs")
        assert not cell.done()
        for pod in pods.values():
            await set_pod_outcome(svc.api, svc.namespace, pod["metadata"]["name"], "succeed")
        res = await cell
    finally:
        if not cell.done():
            await asyncio.to_thread(kernel.interrupt)
            await asyncio.wait_for(cell, 60)
    assert res.status == "ok", res
    out = res.stdout
    assert out.index("[0] rank 0 epoch 1") < out.index("[0] rank 0 epoch 2")
    assert out.count("[1] rank 1 epoch 1") == 1 and out.count("[0] rank 0 epoch 2") == 1
    assert f"Job {job_id}: succeeded" in res.text


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_a_log_bigger_than_one_read_streams_completely_and_once(hub_service, kube_cluster, tmp_path):
    """6 MiB of one worker's log (more than any single read takes) arrive whole, in order and once,
    over several bounded answers; lines written afterwards follow, once each."""
    svc = hub_service
    status, job = svc.call("POST", "/jobs", {"code": CODE, "workers": 1, "run_name": "big-log"})
    assert status == 201, job
    pod = (await _running_pods(svc, job["id"], 1))[0]
    path = tmp_path / "big.log"
    written: list[str] = []
    pad = "x" * 90
    for part in range(6):  # ~1 MiB per write; writes in different seconds exercise sinceTime too
        lines = [f"part {part} line {i:05d} {pad}" for i in range(10_000)]
        append_container_log(path, lines)
        written += lines
        await asyncio.sleep(0.4)
    assert path.stat().st_size > 6 * 1024 * 1024
    await asyncio.to_thread(kube_cluster.serve_logs, svc.namespace, pod["metadata"]["name"], path)

    reader = LogReader(svc, job["id"])
    sizes: list[int] = []

    async def everything() -> bool:
        new = await reader.poll(wait=2)
        sizes.append(sum(len(text.encode()) + 1 for _, text in new))
        return len(reader.lines) >= len(written)

    await wait_for(everything, timeout=180, what="the whole 6 MiB log")
    assert reader.of(0) == written
    assert len([s for s in sizes if s]) >= 6 and max(sizes) <= lc.CHUNK_BYTES  # bounded answers
    assert await reader.poll() == []

    append_container_log(path, ["after the big part 1", "after the big part 2"])
    await reader.until(lambda lines: len(lines) >= len(written) + 2, "the lines written after")
    assert reader.of(0)[len(written):] == ["after the big part 1", "after the big part 2"]
    assert await reader.poll() == []
    status, cancelled = svc.call("POST", f"/jobs/{job['id']}/cancel")
    assert status == 200, cancelled


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_bad_cursors_are_refused_with_400(hub_service):
    svc = hub_service
    status, job = svc.call("POST", "/jobs", {"code": CODE, "workers": 1, "run_name": "bad-cursors"})
    assert status == 201, job
    for cursor in ("0:12,1:5", "garbage", "0.abc.1.2.3.4,0.abd.1.2.3.4", "300.abc.1.2.3.4", "0.abc.1.2.3",
                   "0.abc.1.99999999999999999999.3.4", "0.ABC.1.2.3.4"):
        status, body = svc.call("GET", f"/jobs/{job['id']}/logs?cursor={urllib.parse.quote(cursor)}")
        assert status == 400, (cursor, body)
        assert "cursor" in body["error"] and "next_cursor" in body["error"], body
    # a well-formed cursor naming a pod that is gone reads on from the rank's pods created since
    pod = (await _running_pods(svc, job["id"], 1))[0]
    gone = lc.format_cursor({0: lc.RankPosition("01234567", 1)})
    status, body = svc.call("GET", f"/jobs/{job['id']}/logs?cursor={gone}")
    assert status == 200, body
    assert body["lines"] == [{"rank": 0, "text": f"(worker restarted in a new pod, {pod['metadata']['name']}; "
                                                 f"its log follows)"}]
    status, again = svc.call("GET", f"/jobs/{job['id']}/logs?cursor={body['next_cursor']}")
    assert status == 200 and again["lines"] == [], again  # announced once
    status, cancelled = svc.call("POST", f"/jobs/{job['id']}/cancel")
    assert status == 200, cancelled
