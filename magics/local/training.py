"""Local ``%%train`` jobs: ``torch.distributed.run`` on this machine, recorded on disk.

Layout of ``$HUBML_HOME/jobs/<job-id>/`` (the record that outlives the kernel):

- ``spec.json``: the ``TrainSpec`` as submitted; ``train.py``: the cell;
- ``launch.json``: the torchrun command line, working directory and timeout the
  supervisor uses; ``proc.json``: the supervisor's pid;
- ``status.json``: the ``JobStatus``, written by the kernel once (pending) and
  then only by the supervisor (``supervisor.py``), atomically;
- ``console.log``: torchrun's console: every worker line prefixed ``[rank]:``
  (``--tee``), torchrun's worker events, its own messages;
- ``torchrun/``: torchrun's ``--log-dir`` (one stdout/stderr file per rank);
- ``cancel``: present once a cancel was requested.

The kernel never waits on the workers itself: it creates the MLflow run, writes
the record, starts the supervisor in a new session and returns. Everything else
(streaming, status, cancel) reads or touches these files, which is why a
restarted kernel sees the same jobs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hubml.errors import BackendError, InvalidRequest, NotFound
from hubml.jobs import JobState, JobStatus, LogChunk, LogLine, TrainSpec
from hubml.magics.backend import TrainingBackend
from hubml.magics.local.console import LINE_PREFIX_TEMPLATE, split_complete, parse_line
from hubml.magics.local.home import LocalHome

SUPERVISOR = Path(__file__).with_name("supervisor.py")
JOB_ID = re.compile(r"^job-[0-9a-f]{6}$")
#: Seconds torchrun gives workers to exit after SIGTERM before it SIGKILLs them.
SHUTDOWN_GRACE_S = 5


class LocalTraining(TrainingBackend):
    """The training half of ``LocalBackend``; reads ``self.home`` (set by ``LocalBackend``)."""

    home: LocalHome
    name = "local"

    # -- submit ------------------------------------------------------------
    def submit(self, spec: TrainSpec) -> JobStatus:
        spec.validate()
        check_local_resources(spec)
        client = self._mlflow()
        experiment_id, experiment_name = self._experiment(client, spec.experiment)
        jobs_dir = self.home.jobs_dir
        jobs_dir.mkdir(parents=True, exist_ok=True)
        job_id, job_dir = _new_job_dir(jobs_dir)
        try:
            run = client.create_run(
                experiment_id, run_name=spec.run_name,
                tags={"hubml.job_id": job_id, "hubml.workers": str(spec.workers),
                      "mlflow.source.name": "%%train", "mlflow.user": _user()},
            )
        except Exception as exc:
            _remove_dir(job_dir)
            raise BackendError(
                f"MLflow could not create a run in experiment {experiment_name!r} at "
                f"{self.home.tracking_uri}: {exc}",
                next_step="check that the tracking store is reachable and writable (MLFLOW_TRACKING_URI).",
            ) from exc
        cwd = os.getcwd()
        status = JobStatus(
            id=job_id, state=JobState.PENDING, workers=spec.workers, backend="local",
            created=time.time(), run_id=run.info.run_id, experiment_id=experiment_id,
            experiment=experiment_name, run_name=run.info.run_name, profile=spec.profile,
            gpus_per_worker=spec.gpus_per_worker,
        )
        launch = {
            "job_id": job_id,
            "cmd": torchrun_command(spec, job_dir),
            "cwd": cwd,
            "timeout": spec.timeout,
            "grace": SHUTDOWN_GRACE_S + 5,
            "tracking_uri": self.home.tracking_uri,
            "run_id": run.info.run_id,
        }
        env = worker_env(dict(os.environ), spec, job_id=job_id, home=self.home, cwd=cwd,
                         run_id=run.info.run_id, experiment_id=experiment_id,
                         experiment_name=experiment_name)
        try:
            (job_dir / "train.py").write_text(spec.code, encoding="utf-8")  # as validate() compiled it
            _write_json(job_dir / "spec.json", spec.to_dict())
            _write_json(job_dir / "launch.json", launch)
            _write_json(job_dir / "status.json", status.to_dict())
            with open(job_dir / "supervisor.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-P", str(SUPERVISOR), str(job_dir)], cwd=cwd, env=env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True,
                )
            # The start time tells this process from a later one reusing its pid; unlike the
            # command line it is already right between fork and exec.
            _write_json(job_dir / "proc.json", {"pid": proc.pid, "starttime": proc_starttime(proc.pid)})
        except Exception as exc:
            status.state = JobState.FAILED
            status.finished = time.time()
            status.message = f"Could not start the job supervisor: {exc}"
            _write_json(job_dir / "status.json", status.to_dict())
            client.set_terminated(run.info.run_id, "FAILED")
            raise BackendError(status.message, next_step="see the job directory " + str(job_dir)) from exc
        # Reap the supervisor when it exits so no zombie lingers in a long-lived kernel.
        threading.Thread(target=proc.wait, name=f"hubml-reap-{job_id}", daemon=True).start()
        return status

    # -- queries -----------------------------------------------------------
    def job(self, job_id: str) -> JobStatus:
        job_dir = self._job_dir(job_id)
        status = _read_status(job_dir)
        if not status.state.finished and not self._supervisor_alive(job_dir):
            status = _read_status(job_dir)  # it may have written its last word and exited
            if not status.state.finished:
                status = self._record_lost(job_dir, status)
        if status.state.finished:
            self._finalize_run(job_dir, status)
        return status

    def jobs(self) -> list[JobStatus]:
        result = []
        if self.home.jobs_dir.is_dir():
            for entry in self.home.jobs_dir.iterdir():
                if JOB_ID.match(entry.name) and (entry / "status.json").is_file():
                    try:
                        result.append(self.job(entry.name))
                    except (NotFound, ValueError, KeyError):
                        continue
        return sorted(result, key=lambda s: s.created, reverse=True)

    def read_logs(self, job_id: str, cursor: Any = None) -> LogChunk:
        job_dir = self._job_dir(job_id)
        offset = int(cursor or 0)
        final = _read_status(job_dir).state.finished
        try:
            with open(job_dir / "console.log", "rb") as fh:
                fh.seek(offset)
                data = fh.read(4 * 1024 * 1024)
        except FileNotFoundError:
            return LogChunk([], offset)
        lines, used = split_complete(data, final=final and len(data) < 4 * 1024 * 1024)
        out = []
        for text in lines:
            item = parse_line(text)
            if isinstance(item, LogLine) and item.rank >= 0:
                out.append(item)
        return LogChunk(out, offset + used)

    def launcher_log(self, job_id: str) -> Path:
        """Path of torchrun's console (workers' lines and torchrun's own messages)."""
        return self._job_dir(job_id) / "console.log"

    def run_metrics(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        client = self._mlflow()
        run = client.get_run(run_id)
        history: dict[str, list[tuple[int, float]]] = {}
        for key in sorted(run.data.metrics):
            points = client.get_metric_history(run_id, key)
            history[key] = [(int(m.step), float(m.value)) for m in sorted(points, key=lambda m: (m.step, m.timestamp))]
        return history

    # -- cancel ------------------------------------------------------------
    def cancel(self, job_id: str) -> JobStatus:
        job_dir = self._job_dir(job_id)
        status = self.job(job_id)
        if status.state.finished:
            return status
        (job_dir / "cancel").touch()
        pid = self._supervisor_pid(job_dir)
        if pid is not None and self._supervisor_alive(job_dir):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + SHUTDOWN_GRACE_S + 20
        while time.monotonic() < deadline:
            status = _read_status(job_dir)
            if status.state.finished:
                break
            if not self._supervisor_alive(job_dir):
                break
            time.sleep(0.05)
        status = _read_status(job_dir)
        if not status.state.finished:
            # The supervisor is gone or stuck: stop everything carrying the job id ourselves.
            kill_job_processes(job_id)
            status.state = JobState.CANCELLED
            status.finished = time.time()
            status.message = "Cancelled: every worker was stopped (the job's supervisor did not answer)."
            _write_json(job_dir / "status.json", status.to_dict())
        self._finalize_run(job_dir, status)
        return status

    # -- helpers -----------------------------------------------------------
    def _mlflow(self) -> Any:
        client = getattr(self, "_mlflow_client", None)
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.home.tracking_uri)
            self._mlflow_client = client
        return client

    def _experiment(self, client: Any, name: str | None) -> tuple[str, str]:
        name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or None
        if name is None:
            exp = client.get_experiment("0")
            return exp.experiment_id, exp.name
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return client.create_experiment(name), name
        if exp.lifecycle_stage == "deleted":
            raise InvalidRequest(
                f"Experiment {name!r} was deleted in MLflow; restore it (mlflow experiments restore "
                f"--experiment-id {exp.experiment_id}) or pass another --experiment name."
            )
        return exp.experiment_id, name

    def _job_dir(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise NotFound(
                f"{job_id!r} is not a job id: local job ids look like job-3fa9c1. Run %jobs to list yours."
            )
        job_dir = self.home.jobs_dir / job_id
        if not (job_dir / "status.json").is_file():
            raise NotFound(f"There is no job {job_id} in {self.home.jobs_dir}. Run %jobs to list yours.")
        return job_dir

    @staticmethod
    def _supervisor_record(job_dir: Path) -> dict[str, Any] | None:
        try:
            record = json.loads((job_dir / "proc.json").read_text())
            int(record["pid"])
            return record
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _supervisor_pid(self, job_dir: Path) -> int | None:
        record = self._supervisor_record(job_dir)
        return int(record["pid"]) if record else None

    def _supervisor_alive(self, job_dir: Path) -> bool:
        record = self._supervisor_record(job_dir)
        if record is None:
            # Started moments ago and proc.json not written yet, or never started.
            return (job_dir / "launch.json").exists() and time.time() - _mtime(job_dir / "launch.json") < 10
        pid = int(record["pid"])
        if Path("/proc/self/stat").exists():
            stat = proc_stat(pid)
            if stat is None or stat[0] in ("Z", "X"):
                return False
            return record.get("starttime") in (None, stat[1])
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False

    def _record_lost(self, job_dir: Path, status: JobStatus) -> JobStatus:
        kill_job_processes(status.id)
        status.state = JobState.FAILED
        status.finished = time.time()
        status.message = ("The job's supervisor process ended without recording a result (was the "
                          "machine restarted or the process killed?); every remaining worker was stopped.")
        _write_json(job_dir / "status.json", status.to_dict())
        return status

    def _finalize_run(self, job_dir: Path, status: JobStatus) -> None:
        """Mark the MLflow run with the job's outcome, once (the supervisor may do it instead)."""
        if not status.run_id or (job_dir / "run_finalized").exists():
            return
        try:
            fd = os.open(job_dir / "run_finalized", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        from hubml.magics.local.supervisor import finalize_run

        try:
            finalize_run(self._mlflow(), status.run_id, status.state)
        except Exception:
            (job_dir / "run_finalized").unlink(missing_ok=True)


# -- pure helpers -----------------------------------------------------------
def torchrun_command(spec: TrainSpec, job_dir: Path) -> list[str]:
    """The ``torch.distributed.run`` command line for ``spec`` (single node, static ranks)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(spec.workers),
        "--max-restarts", "0",
        "--log-dir", str(job_dir / "torchrun"), "--tee", "3",
        "--log-line-prefix-template", LINE_PREFIX_TEMPLATE,
        "--event-log-handler", "console",
        "--shutdown-timeout", str(SHUTDOWN_GRACE_S),
        str(job_dir / "train.py"),
    ]


def worker_env(base: dict[str, str], spec: TrainSpec, *, job_id: str, home: LocalHome, cwd: str,
               run_id: str, experiment_id: str, experiment_name: str) -> dict[str, str]:
    """The environment of the supervisor, torchrun and (inherited) every worker.

    The kernel's environment, minus what only makes sense inside a kernel
    (the inline matplotlib backend), plus the user's ``--env`` values, the
    MLflow run to log into, and the notebook's directory on ``PYTHONPATH`` so
    that modules next to the notebook import as they do in the kernel.
    """
    env = dict(base)
    if env.get("MPLBACKEND", "").startswith("module://matplotlib_inline"):
        env.pop("MPLBACKEND")
    env.update(spec.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, base.get("PYTHONPATH", "")) if p)
    env.update({
        "HUBML_JOB_ID": job_id,
        "HUBML_HOME": str(home.root),
        "MLFLOW_TRACKING_URI": home.tracking_uri,
        "MLFLOW_RUN_ID": run_id,
        "MLFLOW_EXPERIMENT_ID": experiment_id,
        "MLFLOW_EXPERIMENT_NAME": experiment_name,
        "LOGLEVEL": "INFO",  # torchrun's worker events are logged at INFO
    })
    return env


def check_local_resources(spec: TrainSpec) -> None:
    """Refuse what this machine cannot give, before anything is created."""
    if spec.profile is not None:
        raise InvalidRequest(
            f"--profile {spec.profile} selects a GPU profile of the hub, but this notebook uses the local "
            f"backend (workers run on this machine). Drop --profile here, or run on a hub with "
            f"--backend hub."
        )
    if spec.gpus_per_worker:
        have = count_local_gpus()
        need = spec.gpus_per_worker * spec.workers
        if need > have:
            raise InvalidRequest(
                f"--gpus-per-worker {spec.gpus_per_worker} with --workers {spec.workers} needs {need} GPU(s), "
                f"but this machine has {have}. Use --gpus-per-worker 0 to train on CPU (gloo), or fewer workers."
            )


def count_local_gpus() -> int:
    """NVIDIA GPUs visible to this process, without importing torch (kernel start-up matters)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        present = len([p for p in os.listdir("/proc/driver/nvidia/gpus")])
    except OSError:
        present = 0
    if visible is None:
        return present
    ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    return min(len(ids), present)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, starttime)`` of a live pid from ``/proc/<pid>/stat`` (Linux), else ``None``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the command name may contain spaces and ')'
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def proc_starttime(pid: int) -> int | None:
    stat = proc_stat(pid)
    return stat[1] if stat else None


def kill_job_processes(job_id: str) -> None:
    """SIGKILL every process whose environment carries ``HUBML_JOB_ID=job_id`` (Linux /proc)."""
    marker = f"HUBML_JOB_ID={job_id}".encode()
    me = os.getpid()
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit() and int(e) != me]
    except OSError:
        return
    for entry in entries:
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    os.kill(int(entry), signal.SIGKILL)
        except OSError:
            continue


def _new_job_dir(jobs_dir: Path) -> tuple[str, Path]:
    for _ in range(100):
        job_id = f"job-{secrets.token_hex(3)}"
        job_dir = jobs_dir / job_id
        try:
            job_dir.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return job_id, job_dir
    raise BackendError(f"Could not create a new job directory in {jobs_dir}.")


def _read_status(job_dir: Path) -> JobStatus:
    for _ in range(20):
        try:
            return JobStatus.from_dict(json.loads((job_dir / "status.json").read_text()))
        except (ValueError, FileNotFoundError):
            time.sleep(0.01)  # replaced atomically; a reader can only miss it on odd filesystems
    raise NotFound(f"The record of job {job_dir.name} in {job_dir} is unreadable.")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _remove_dir(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
