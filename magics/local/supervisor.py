"""The detached supervisor of one local ``%%train`` job.

Why a separate process: a job must end up recorded (final state, which rank
failed with which exit code) even when it was started with ``--no-wait`` or the
kernel that started it died or restarted. The kernel starts this script in its
own session (so Jupyter's interrupt, which signals the kernel's process group,
never reaches it); it starts ``python -m torch.distributed.run`` and waits.

It stays small on purpose (standard library plus ``hubml.jobs`` and the pure
``console`` reader): its start-up time is part of every job's wall time.
It imports MLflow only in the rare case where no kernel marks the run as
finished (``--no-wait``, dead kernel).

Stopping: SIGTERM/SIGINT/SIGHUP or a ``cancel`` file in the job directory →
SIGTERM to torchrun, which forwards it to its workers and SIGKILLs them after
``--shutdown-timeout``; whatever is still alive after that (a worker's own
children, or everything when torchrun itself is stuck) is killed: the workers'
process groups (torchrun starts each worker in its own session), then every
process carrying this job's ``HUBML_JOB_ID``. The supervisor makes itself a
child subreaper so orphans of the job are re-parented to it and reaped.

Usage (by the local backend only): ``python supervisor.py JOB_DIR``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hubml.jobs import JobState, JobStatus, WorkerStatus
from hubml.magics.local.console import (
    LAUNCHER, WorkerEvent, describe_exit, parse_line, root_cause, split_complete,
)

POLL_S = 0.05
FINALIZE_WAIT_S = 3.0
LEFTOVER_WAIT_S = 10.0  # how long the job's killed processes may take to go before its state is final


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class Supervisor:
    def __init__(self, job_dir: Path) -> None:
        self.dir = job_dir
        self.launch = json.loads((job_dir / "launch.json").read_text())
        self.job_id: str = self.launch["job_id"]
        self.console_path = job_dir / "console.log"
        self.events: list[WorkerEvent] = []
        self._offset = 0
        self.stop_reason: str | None = None
        self.proc: subprocess.Popen | None = None

    # -- status ------------------------------------------------------------
    def status(self) -> JobStatus:
        return JobStatus.from_dict(json.loads((self.dir / "status.json").read_text()))

    def save(self, status: JobStatus) -> None:
        write_json_atomic(self.dir / "status.json", status.to_dict())

    # -- events ------------------------------------------------------------
    def read_events(self, final: bool = False) -> bool:
        """Parse new console lines; True when a worker event arrived."""
        try:
            with open(self.console_path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return False
        lines, used = split_complete(data, final=final)
        self._offset += used
        changed = False
        for line in lines:
            item = parse_line(line)
            if isinstance(item, WorkerEvent):
                self.events.append(item)
                changed = True
        return changed

    def worker_states(self, workers: int) -> list[WorkerStatus]:
        states = {rank: WorkerStatus(rank=rank) for rank in range(workers)}
        for event in self.events:
            state = {"START": JobState.RUNNING, "SUCCEEDED": JobState.SUCCEEDED,
                     "FAILED": JobState.FAILED}.get(event.state)
            if state is not None and event.rank in states:
                states[event.rank].state = state
                if state.finished:
                    states[event.rank].exit_code = event.exit_code
        return [states[rank] for rank in sorted(states)]

    # -- processes ---------------------------------------------------------
    def worker_pids(self) -> set[int]:
        return {e.pid for e in self.events if e.state == "START" and e.pid}

    def job_processes(self) -> list[int]:
        """Pids (other than this one) whose environment carries this job's id (Linux /proc)."""
        marker = f"HUBML_JOB_ID={self.job_id}".encode()
        found = []
        try:
            entries = os.listdir("/proc")
        except OSError:
            return found
        me = os.getpid()
        for entry in entries:
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if marker in fh.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
        return found

    def kill_leftovers(self, wait: float = LEFTOVER_WAIT_S) -> None:
        """Kill what is left of the job and return once it is gone (or ``wait`` ran out).

        SIGKILL is not instant: a worker holding torch's GiB of mappings can take
        a while to exit on a busy machine, and until it has, the job's final state
        would be written over a process still running (the kernel-side promise is
        "no worker outlives the job")."""
        for pid in self.worker_pids():
            try:
                os.killpg(pid, signal.SIGKILL)  # each worker leads its own session
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while True:
            self.reap()
            pids = self.job_processes()  # a zombie's environ reads empty: only the living match
            if not pids or time.monotonic() >= deadline:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)

    @staticmethod
    def reap() -> None:
        """Collect orphans re-parented to us (we are a child subreaper)."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def stop(self, grace: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.kill_leftovers()

    # -- main loop ---------------------------------------------------------
    def run(self) -> int:
        _become_subreaper()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        status = self.status()
        status.started = time.time()
        console = open(self.console_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.launch["cmd"], cwd=self.launch["cwd"], stdin=subprocess.DEVNULL,
                stdout=console, stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            status.state = JobState.FAILED
            status.finished = time.time()
            status.message = f"Could not start torch.distributed.run: {exc}."
            self.save(status)
            return 1
        finally:
            console.close()
        status.worker_states = self.worker_states(status.workers)
        self.save(status)
        timeout = self.launch.get("timeout")
        grace = float(self.launch.get("grace", 10))
        deadline = status.started + timeout if timeout else None
        cancel_file = self.dir / "cancel"
        while True:
            try:
                rc = self.proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if self.read_events():
                status.worker_states = self.worker_states(status.workers)
                if status.state is JobState.PENDING and all(
                        w.state is not JobState.PENDING for w in status.worker_states):
                    status.state = JobState.RUNNING
                self.save(status)
            if self.stop_reason is None and cancel_file.exists():
                self.stop_reason = "cancelled"
            if self.stop_reason is None and deadline is not None and time.time() >= deadline:
                self.stop_reason = "timeout"
            if self.stop_reason is not None:
                self.stop(grace)
                rc = self.proc.returncode
                break
        self.kill_leftovers()
        self.reap()
        self.read_events(final=True)
        self.finish(status, rc, timeout)
        self.finalize_run(status)
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_reason = self.stop_reason or "cancelled"

    def finish(self, status: JobStatus, rc: int | None, timeout: float | None) -> None:
        status.finished = time.time()
        status.worker_states = self.worker_states(status.workers)
        if self.stop_reason == "cancelled":
            status.state = JobState.CANCELLED
            status.message = "Cancelled: every worker was stopped."
        elif self.stop_reason == "timeout":
            status.state = JobState.FAILED
            status.message = (f"Stopped after the --timeout of {_fmt_seconds(timeout or 0)}: "
                              f"every worker was killed.")
        elif rc == 0:
            status.state = JobState.SUCCEEDED
            status.message = ""
        else:
            status.state = JobState.FAILED
            cause = root_cause(self.events)
            if cause is not None:
                status.failed_rank = cause.rank
                status.exit_code = cause.exit_code
                status.message = (f"Rank {cause.rank} failed with {describe_exit(cause.exit_code)}; "
                                  f"torch.distributed.run stopped the other workers.")
            else:
                status.exit_code = rc
                status.message = (f"torch.distributed.run exited with {describe_exit(rc)} before any "
                                  f"worker reported a result.\n" + self.launcher_tail())
        for worker in status.worker_states:
            if not worker.state.finished:
                worker.state = JobState.CANCELLED if status.state is not JobState.SUCCEEDED else worker.state
        self.save(status)

    def launcher_tail(self, lines: int = 15) -> str:
        try:
            data = self.console_path.read_bytes()[-32768:]
        except OSError:
            return ""
        text, _ = split_complete(data, final=True)
        own = [item.text for item in map(parse_line, text)
               if item is not None and getattr(item, "rank", None) == LAUNCHER]
        return "\n".join(own[-lines:])

    def finalize_run(self, status: JobStatus) -> None:
        """Mark the MLflow run finished/failed/killed unless a kernel does it first."""
        if not self.launch.get("run_id"):
            return
        deadline = time.monotonic() + FINALIZE_WAIT_S
        marker = self.dir / "run_finalized"
        while time.monotonic() < deadline:
            if marker.exists():
                return
            time.sleep(0.1)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        try:
            from mlflow.tracking import MlflowClient

            finalize_run(MlflowClient(self.launch["tracking_uri"]), self.launch["run_id"], status.state)
        except Exception as exc:  # the job's record is already written; report and move on
            print(f"could not mark MLflow run {self.launch['run_id']}: {exc}", file=sys.stderr)


def finalize_run(client: object, run_id: str, state: JobState) -> None:
    """Set the run's MLflow status from the job's final state (shared with the kernel)."""
    target = {JobState.SUCCEEDED: "FINISHED", JobState.FAILED: "FAILED",
              JobState.CANCELLED: "KILLED"}[state]
    run = client.get_run(run_id)  # type: ignore[attr-defined]
    if run.info.status != target:
        client.set_terminated(run_id, target)  # type: ignore[attr-defined]


def _become_subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _fmt_seconds(value: float) -> str:
    if value >= 3600 and value % 3600 == 0:
        return f"{int(value // 3600)}h"
    if value >= 60 and value % 60 == 0:
        return f"{int(value // 60)}m"
    return f"{value:g}s"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: supervisor.py JOB_DIR", file=sys.stderr)
        return 2
    return Supervisor(Path(argv[1])).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
