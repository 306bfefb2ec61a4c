"""The pure parts of %%train: reading torchrun's console, the worker environment,
the command line, local resource checks, and the live view's rendering."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hubml.errors import InvalidRequest, JobFailed, JobCancelled
from hubml.jobs import JobState, JobStatus, LogLine, TrainSpec, WorkerStatus
from hubml.magics.local.console import (
    LAUNCHER, WorkerEvent, describe_exit, parse_line, root_cause, split_complete,
)
from hubml.magics.local.home import LocalHome
from hubml.magics.local.training import check_local_resources, torchrun_command, worker_env
from hubml.magics.train import jobs_table, status_text
from hubml.magics.watch import default_metric, raise_for_status, summary_line, svg_plot


def _event(state: str, rank: int, pid: int, code: int | None) -> str:
    """A worker event line in the shape torch 2.15's console event handler writes it."""
    inner = {"group_world_size": 1, "entry_point": "python", "local_rank": [rank], "role_rank": [rank],
             "role_world_size": [2], "exit_code": [code], "worker_pid": [pid]}
    return json.dumps({"name": f"torchelastic.worker.status.{state}", "source": "WORKER", "timestamp": 0,
                       "metadata": {"run_id": "x", "global_rank": rank, "group_rank": 0, "worker_id": str(pid),
                                    "role": "default", "hostname": "localhost", "state": state,
                                    "total_run_time": 1, "rdzv_backend": "c10d", "raw_error": None,
                                    "metadata": json.dumps(inner), "agent_restarts": 0, "duration_ms": None}})


def test_split_complete_keeps_a_partial_line_for_later():
    lines, used = split_complete(b"[0]:a\n[1]:b\n[0]:par")
    assert lines == ["[0]:a", "[1]:b"] and used == 12
    lines, used = split_complete(b"[0]:par", final=True)
    assert lines == ["[0]:par"] and used == 7
    assert split_complete(b"no newline yet") == ([], 0)


def test_parse_line_tells_worker_lines_events_and_launcher_output_apart():
    assert parse_line("[1]:hello [2]: world") == LogLine(1, "hello [2]: world")
    assert parse_line("[0]:") == LogLine(0, "")
    assert parse_line(_event("FAILED", 1, 4242, 3)) == WorkerEvent("FAILED", 1, 4242, 3)
    assert parse_line(_event("START", 0, 17, None)) == WorkerEvent("START", 0, 17, None)
    agent = json.dumps({"name": "torchelastic.worker.status.SUCCEEDED", "source": "AGENT",
                        "metadata": {"global_rank": None}})
    assert parse_line(agent) is None
    assert parse_line("W1124 02:26:59 api.py:1028] Sending process 1 closing signal SIGTERM") == \
        LogLine(LAUNCHER, "W1124 02:26:59 api.py:1028] Sending process 1 closing signal SIGTERM")


def test_root_cause_is_the_failure_that_was_not_torchruns_own_sigterm():
    events = [WorkerEvent("START", 0, 1, None), WorkerEvent("START", 1, 2, None),
              WorkerEvent("FAILED", 0, 1, -15), WorkerEvent("FAILED", 1, 2, 3)]
    assert root_cause(events) == WorkerEvent("FAILED", 1, 2, 3)
    assert root_cause([WorkerEvent("FAILED", 0, 1, -15)]) == WorkerEvent("FAILED", 0, 1, -15)
    oom = [WorkerEvent("FAILED", 0, 1, -15), WorkerEvent("FAILED", 1, 2, -9)]
    assert root_cause(oom) == WorkerEvent("FAILED", 1, 2, -9)
    assert root_cause([WorkerEvent("SUCCEEDED", 0, 1, 0)]) is None
    assert describe_exit(-9) == "exit code -9 (killed by SIGKILL)" and describe_exit(2) == "exit code 2"


def test_torchrun_command_uses_pytorchs_launcher_with_per_rank_logs(tmp_path: Path):
    cmd = torchrun_command(TrainSpec(code="print(1)", workers=3), tmp_path)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "3"
    assert cmd[cmd.index("--log-dir") + 1] == str(tmp_path / "torchrun")
    assert cmd[cmd.index("--tee") + 1] == "3"
    assert cmd[cmd.index("--log-line-prefix-template") + 1] == "[${rank}]:"
    assert "--standalone" in cmd and cmd[-1] == str(tmp_path / "train.py")


def test_worker_env_carries_tracking_and_user_values_and_drops_kernel_only_settings(tmp_path: Path):
    home = LocalHome(root=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    base = {"PATH": "/bin", "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONPATH": "/lib"}
    spec = TrainSpec(code="x", env={"LR": "0.1"})
    env = worker_env(base, spec, job_id="job-abc123", home=home, cwd="/nb", run_id="r1",
                     experiment_id="7", experiment_name="iris")
    assert env["MLFLOW_RUN_ID"] == "r1" and env["MLFLOW_EXPERIMENT_ID"] == "7"
    assert env["MLFLOW_TRACKING_URI"] == home.tracking_uri and env["HUBML_JOB_ID"] == "job-abc123"
    assert env["LR"] == "0.1" and env["PATH"] == "/bin" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(":") == ["/nb", "/lib"]
    assert "MPLBACKEND" not in env
    assert base["MPLBACKEND"]  # the kernel's own environment is left alone


def test_local_backend_refuses_profiles_and_missing_gpus(monkeypatch):
    with pytest.raises(InvalidRequest, match="--profile a100 selects a GPU profile of the hub"):
        check_local_resources(TrainSpec(code="x", profile="a100"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(InvalidRequest, match="needs 4 GPU"):
        check_local_resources(TrainSpec(code="x", workers=2, gpus_per_worker=2))
    check_local_resources(TrainSpec(code="x", workers=2))


def _status(**kw) -> JobStatus:
    base = dict(id="job-abc123", state=JobState.SUCCEEDED, workers=2, backend="local", created=1000.0,
                started=1000.0, finished=1075.0, run_id="r1", run_name="brave-cat", experiment="iris",
                worker_states=[WorkerStatus(0, JobState.SUCCEEDED, 0), WorkerStatus(1, JobState.SUCCEEDED, 0)])
    base.update(kw)
    return JobStatus(**base)


def test_summary_table_and_status_text():
    metrics = {"acc": [(0, 0.5), (1, 0.75)], "loss": [(0, 2.0), (1, 0.25)]}
    line = summary_line(_status(), metrics)
    assert line == "Job job-abc123: succeeded · 2 worker(s) · 1:15 elapsed · acc=0.75, loss=0.25 · run r1"
    table = jobs_table([_status(), _status(id="job-000001", state=JobState.RUNNING, finished=None,
                                          started=None)]).splitlines()
    assert table[0].split() == ["JOB", "STATE", "WORKERS", "CREATED", "ELAPSED", "EXPERIMENT", "RUN"]
    assert table[1].split()[:3] == ["job-abc123", "succeeded", "2"] and "1:15" in table[1]
    assert table[2].split()[:2] == ["job-000001", "running"]
    failed = status_text(_status(state=JobState.FAILED, failed_rank=1, exit_code=3, message="Rank 1 failed.",
                                 worker_states=[WorkerStatus(0, JobState.FAILED, -15),
                                                WorkerStatus(1, JobState.FAILED, 3)]))
    assert "rank 1, exit code 3" in failed and "1 failed (exit 3)" in failed


def test_plot_picks_the_loss_and_draws_every_point():
    assert default_metric(["acc", "val_loss", "loss"]) == "loss"
    assert default_metric(["acc", "my_loss_x"]) == "my_loss_x"
    assert default_metric(["acc"]) == "acc" and default_metric([]) is None
    svg = svg_plot([(0, 2.0), (1, 1.0), (2, float("nan")), (3, 0.5)], title="loss")
    points = svg.split("points='")[1].split("'")[0].split()
    assert len(points) == 3  # NaN skipped
    ys = [float(p.split(",")[1]) for p in points]
    assert ys[0] > ys[1] > ys[2] or ys[0] < ys[1] < ys[2]  # monotone like the data
    assert "loss: 0.5 (step 3)" in svg
    assert "polyline" not in svg_plot([], title="none yet")


def test_raise_for_status_names_rank_exit_code_and_tail():
    from collections import deque

    status = _status(state=JobState.FAILED, failed_rank=1, exit_code=3, message="Rank 1 failed with exit code 3.")
    with pytest.raises(JobFailed) as info:
        raise_for_status(status, {1: deque(["line a", "ValueError: boom"])})
    rendered = "\n".join(info.value._render_traceback_())
    assert "Rank 1 failed with exit code 3" in rendered and "ValueError: boom" in rendered
    assert "%train_logs job-abc123 --rank 1" in rendered
    assert info.value.rank == 1 and info.value.exit_code == 3
    with pytest.raises(JobCancelled):
        raise_for_status(_status(state=JobState.CANCELLED))
    assert raise_for_status(_status()) .state is JobState.SUCCEEDED


def test_a_rank_aborted_by_gloos_teardown_is_told_to_leave_with_a_barrier():
    """A rank that leaves while its peer still uploads the model dies of SIGABRT with only
    libstdc++'s line to show for it: the next step must say what ends a cell safely."""
    from collections import deque

    status = _status(state=JobState.FAILED, failed_rank=1, exit_code=-6,
                     message="Rank 1 failed with exit code -6 (killed by SIGABRT).")
    with pytest.raises(JobFailed) as info:
        raise_for_status(status, {0: deque(["accuracy 0.980"]),
                                  1: deque(["terminate called without an active exception", ""])})
    rendered = "\n".join(info.value._render_traceback_())
    assert "dist.barrier()" in rendered and "dist.destroy_process_group()" in rendered
    assert "%train_logs job-abc123 --rank 1" in rendered
    # the same line on a rank that did not fail says nothing about the one that did
    with pytest.raises(JobFailed) as other:
        raise_for_status(status, {0: deque(["terminate called without an active exception"]),
                                  1: deque(["ValueError: boom"])})
    assert "dist.barrier()" not in "\n".join(other.value._render_traceback_())


def test_proc_stat_identifies_a_process_across_exec_and_forgets_it_once_reaped():
    import os
    import subprocess

    from hubml.magics.local.training import proc_stat, proc_starttime

    state, start = proc_stat(os.getpid())
    assert state == "R" and start > 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    first = proc_starttime(child.pid)
    assert first is not None and first >= start
    child.wait()
    assert proc_stat(child.pid) is None
