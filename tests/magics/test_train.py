"""%%train end to end in a real IPython kernel: torch DDP (gloo, CPU, 2 workers)
started by torch.distributed.run, a real sqlite MLflow store, real processes.
"""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from hubml_testing.kernel import KernelSession, kernel_env
from hubml_testing.train_cells import (
    DDP_CELL, FAILING_CELL, QUICK_CELL, SLEEPY_CELL, job_dirs, wait_gone, worker_processes,
)

pytestmark = pytest.mark.slow


def _client(home) -> MlflowClient:
    return MlflowClient(kernel_env(home)["MLFLOW_TRACKING_URI"])


def _only_job(home) -> str:
    dirs = job_dirs(home)
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_ddp_job_logs_params_metrics_and_model_into_the_run(hubml_kernel: KernelSession, hubml_home):
    res = hubml_kernel.run("%%train --workers 2 --experiment iris --run-name ddp-test --env LR=0.05\n" + DDP_CELL,
                           timeout=280)
    assert res.status == "ok", res
    # Both ranks' lines, prefixed with their rank, and a real all-reduce across them.
    assert "[0] world=2 rank-sum=1" in res.stdout and "[1] world=2 rank-sum=1" in res.stdout, res
    assert "[0] done rank 0" in res.stdout and "[1] done rank 1" in res.stdout

    job_id = _only_job(hubml_home)
    status = json.loads((hubml_home / "jobs" / job_id / "status.json").read_text())
    assert status["state"] == "succeeded"
    assert [w["state"] for w in status["worker_states"]] == ["succeeded", "succeeded"]

    client = _client(hubml_home)
    run = client.get_run(status["run_id"])
    assert run.info.run_name == "ddp-test"
    assert client.get_experiment(run.info.experiment_id).name == "iris"
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.05", "world_size": "2"}
    assert run.data.tags["hubml.job_id"] == job_id
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 8 and losses[-1] < losses[0]

    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(kernel_env(hubml_home)["MLFLOW_TRACKING_URI"])
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(1, 4)).shape == (1, 1)

    # The panel: a widget view with a text/plain summary for frontends without widgets,
    # updated to the final state, and a live SVG plot of the loss sent over the widget comms.
    bundles = [d["data"] for d in res.displays]
    assert any("application/vnd.jupyter.widget-view+json" in b for b in bundles)
    assert f"Job {job_id}: succeeded" in bundles[-1]["text/plain"] and "loss=" in bundles[-1]["text/plain"]
    states = json.dumps([o for o in res.outputs if o["msg_type"] == "comm_msg"])
    assert "polyline" in states and "loss" in states

    # The session remembers the run for %register_model.
    remembered = hubml_kernel.run_ok("from hubml.magics.session import SESSION; print(SESSION.last_run_id)")
    assert remembered.stdout.strip() == run.info.run_id
    assert wait_gone(hubml_home, hubml_kernel) == []


def test_failing_rank_ends_the_job_with_rank_exit_code_and_log_tail(kernel_factory, hubml_home):
    kernel = kernel_factory(extra_env={"HUBML_LIVE_VIEW": "text"})
    res = kernel.run("%%train -n 2\n" + FAILING_CELL, timeout=240)
    assert res.status == "error" and res.ename == "JobFailed", res
    text = res.error_text
    assert "Rank 1 failed with exit code 1" in text
    assert "boom from rank 1" in text and "about to fail" in text  # the tail of rank 1's log
    assert "Last" in text and "rank 1" in text
    assert "Traceback (most recent call last)" in text  # the worker's own traceback, not ours
    assert "hubml/magics" not in text  # no traceback wall from the magic
    # Text fallback: no widget, lines still prefixed.
    assert not [d for d in res.displays if "application/vnd.jupyter.widget-view+json" in d["data"]]
    assert "[0] rank 0 up" in res.stdout

    job_id = _only_job(hubml_home)
    status = json.loads((hubml_home / "jobs" / job_id / "status.json").read_text())
    assert status["state"] == "failed" and status["failed_rank"] == 1 and status["exit_code"] == 1
    assert _client(hubml_home).get_run(status["run_id"]).info.status == "FAILED"
    assert worker_processes(hubml_home, kernel) == []  # torchrun stopped rank 0 before the status was final
    assert wait_gone(hubml_home, kernel) == []

    shown = kernel.run_ok(f"%train_status {job_id}").stdout
    assert "failed" in shown and "rank 1, exit code 1" in shown


def test_interrupting_the_cell_stops_every_worker(hubml_kernel: KernelSession, hubml_home):
    res = hubml_kernel.run("%%train --workers 2\n" + SLEEPY_CELL, timeout=240,
                           interrupt_when=lambda r: "[0] tick 0" in r.stdout and "[1] tick 1" in r.stdout)
    assert res.ename == "JobCancelled", res
    assert "Interrupted" in res.evalue
    # cancel() returned only after the supervisor recorded the end, which it does after the
    # workers and torchrun are gone: nothing but the exiting supervisor may remain.
    assert worker_processes(hubml_home, hubml_kernel) == []
    assert wait_gone(hubml_home, hubml_kernel) == []
    job_id = _only_job(hubml_home)
    status = json.loads((hubml_home / "jobs" / job_id / "status.json").read_text())
    assert status["state"] == "cancelled"
    assert _client(hubml_home).get_run(status["run_id"]).info.status == "KILLED"
    # The kernel is still usable.
    assert hubml_kernel.run_ok("print(1 + 1)").stdout == "2\n"


def test_no_wait_then_status_logs_and_cancel(hubml_kernel: KernelSession, hubml_home):
    res = hubml_kernel.run_ok("%%train --workers 2 --no-wait\n" + SLEEPY_CELL)
    job_id = _only_job(hubml_home)
    assert f"%train_cancel {job_id}" in res.stdout
    assert hubml_kernel.run_ok(f"%train_status {job_id}").stdout.split("\n")[0] in (
        f"Job {job_id}: pending (local backend)", f"Job {job_id}: running (local backend)")
    # Wait (through the magic) until both ranks have written something, then read the log.
    hubml_kernel.run_ok(
        "import time\nfrom hubml.magics.session import SESSION\nb = SESSION.backend()\n"
        f"while sum(1 for l in b.read_logs('{job_id}').lines if l.text.startswith('tick')) < 4"
        f" or b.job('{job_id}').state.value != 'running': time.sleep(0.1)"
    )
    logs = hubml_kernel.run_ok(f"%train_logs {job_id} --rank 1").stdout
    assert "[1] tick 1" in logs and "[0]" not in logs
    listed = hubml_kernel.run_ok("%jobs").stdout
    assert job_id in listed and "running" in listed

    cancelled = hubml_kernel.run_ok(f"%train_cancel {job_id}").stdout
    assert f"Job {job_id}: cancelled" in cancelled
    assert worker_processes(hubml_home, hubml_kernel) == []
    assert wait_gone(hubml_home, hubml_kernel) == []
    assert "cancelled" in hubml_kernel.run_ok("%train_status").stdout
    again = hubml_kernel.run_ok(f"%train_cancel {job_id}").stdout
    assert "already ended (cancelled)" in again


def test_timeout_kills_the_job(hubml_kernel: KernelSession, hubml_home):
    res = hubml_kernel.run("%%train --workers 2 --timeout 20s\n" + SLEEPY_CELL, timeout=240)
    assert res.ename == "JobFailed", res
    assert "--timeout of 20s" in res.evalue and "raise --timeout" in res.error_text
    assert worker_processes(hubml_home, hubml_kernel) == []
    assert wait_gone(hubml_home, hubml_kernel) == []
    status = json.loads((hubml_home / "jobs" / _only_job(hubml_home) / "status.json").read_text())
    assert status["state"] == "failed" and status["failed_rank"] is None
    assert status["finished"] - status["started"] >= 20  # it ran until the limit, not less
    assert _client(hubml_home).get_run(status["run_id"]).info.status == "FAILED"


def test_jobs_and_logs_survive_a_kernel_restart(hubml_kernel: KernelSession, hubml_home):
    # --no-wait, then the kernel dies at once: the supervisor still records the outcome
    # and marks the MLflow run, with no kernel left to do it.
    hubml_kernel.run_ok("%%train --workers 2 --no-wait --env GREETING=hi\n" + QUICK_CELL)
    job_id = _only_job(hubml_home)
    old_pid = hubml_kernel.pid
    hubml_kernel.restart()
    assert hubml_kernel.pid != old_pid

    followed = hubml_kernel.run_ok(f"%train_logs {job_id} --follow", timeout=240).stdout
    assert "[0] quick hello from 0 of 2 GREETING=hi" in followed
    assert "[1] quick hello from 1 of 2 GREETING=hi" in followed
    listed = hubml_kernel.run_ok("%jobs").stdout
    assert job_id in listed and "succeeded" in listed
    assert f"Job {job_id}: succeeded" in hubml_kernel.run_ok("%train_status").stdout
    logs = hubml_kernel.run_ok(f"%train_logs {job_id}").stdout
    assert logs.count("quick hello") == 2
    assert wait_gone(hubml_home, hubml_kernel) == []
    status = json.loads((hubml_home / "jobs" / job_id / "status.json").read_text())
    assert _client(hubml_home).get_run(status["run_id"]).info.status == "FINISHED"
    bad = hubml_kernel.run(f"%train_logs {job_id} --rank 2")
    assert bad.ename == "UsageError" and "ranks are 0 to 1" in bad.evalue


def test_help_says_how_the_cell_is_carried(hubml_kernel: KernelSession):
    res = hubml_kernel.run_ok("%%train?")
    page = "".join(p.get("data", {}).get("text/plain", "") for p in res.payload)
    for expected in ("--workers", "--gpus-per-worker", "--profile", "--experiment", "--run-name", "--env",
                     "--timeout", "--no-wait", "standalone", "NOT carried", "MLFLOW_RUN_ID"):
        assert expected in page, expected


def test_plain_ipython_gets_the_text_view(hubml_home):
    """No kernel, no comms (terminal IPython): lines and a summary as text, no widget."""
    import os
    import subprocess
    import sys

    cell = hubml_home / "cell.py"
    cell.write_text(QUICK_CELL)
    env = dict(os.environ, **kernel_env(hubml_home))
    env.pop("HUBML_LIVE_VIEW", None)
    code = ("ip = get_ipython(); ip.run_line_magic('load_ext', 'hubml'); "
            f"ip.run_cell_magic('train', '--workers 2 --env GREETING=terminal', open({str(cell)!r}).read())")
    proc = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--quick", "--colors=nocolor", "-c", code],
                          env=env, cwd=hubml_home, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[0] quick hello from 0 of 2 GREETING=terminal" in out
    assert "[1] quick hello from 1 of 2 GREETING=terminal" in out
    job_id = _only_job(hubml_home)
    assert f"Job {job_id}: succeeded · 2 worker(s)" in out
    assert "VBox" not in out and "widget" not in out.lower()
