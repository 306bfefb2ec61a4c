"""``%%train`` and the job magics: ``%jobs``, ``%train_status``, ``%train_logs``, ``%train_cancel``.

Argument parsing is IPython's ``magic_arguments`` (so ``%%train?`` shows the
full help and a wrong flag is a ``UsageError``); the work goes through the
session's ``Backend``; the live view is ``watch.py``. Errors a user can fix
(``InvalidRequest``, ``NotFound``, ``Conflict``, ``Forbidden``) become one
``UsageError`` paragraph; failures of the job itself raise ``JobFailed`` /
``JobCancelled``, which IPython renders without a traceback.
"""

from __future__ import annotations

import functools
import shlex
import time
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from hubml.errors import Conflict, Forbidden, InvalidRequest, NotFound
from hubml.jobs import JobStatus, TrainSpec
from hubml.names import env_pairs
from hubml.quantities import DURATION_EXAMPLES, parse_duration
from hubml.magics import watch as live
from hubml.magics.session import SESSION


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix into IPython's one-paragraph ``UsageError``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (InvalidRequest, NotFound, Conflict, Forbidden) as exc:
            raise UsageError(" ".join(str(exc).split())) from None

    return wrapper


def parse_line(magic: Callable[..., Any], line: str) -> Any:
    """``magic_arguments`` parsing with shell quoting (``--run-name "first try"``).

    IPython's own ``parse_argstring`` splits without removing quotes, which
    would name a run ``"first try"`` with the quotes; wrong flags and values
    still raise ``UsageError`` through ``MagicArgumentParser.error``.
    """
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"Could not read the options {line.strip()!r}: {exc} (check the quotes).") from None
    return magic.parser.parse_args(argv)


def train_spec(args: Any, cell: str) -> TrainSpec:
    """The validated ``TrainSpec`` a parsed ``%%train`` line and its cell ask for.

    Separate from the magic so that what the options mean (``--timeout 1h30m`` is
    5400 seconds, by :func:`hubml.quantities.parse_duration` like every other
    duration) can be checked without starting a job; nothing is created here.
    """
    timeout = parse_duration(args.timeout, "--timeout") if args.timeout is not None else None
    return TrainSpec(
        code=cell, workers=args.workers, gpus_per_worker=args.gpus_per_worker, profile=args.profile,
        experiment=args.experiment, run_name=args.run_name, env=env_pairs(args.env), timeout=timeout,
    ).validate()


def _backend(name: str | None) -> Any:
    return SESSION.backend(name)


def _job_or_last(backend: Any, job_id: str | None) -> str:
    if job_id:
        return job_id
    if SESSION.last_job_id:
        return SESSION.last_job_id
    jobs = backend.jobs()
    if not jobs:
        raise NotFound("There is no training job yet: run a %%train cell first, or name a job id (see %jobs).")
    return jobs[0].id


@magics_class
class TrainMagics(Magics):
    """Distributed training from a notebook cell, on the local machine or the hub."""

    @magic_arguments()
    @argument("--workers", "-n", type=int, default=1, metavar="N",
              help="Number of worker processes (ranks), 1 to 256. Default 1.")
    @argument("--gpus-per-worker", type=int, default=0, metavar="G",
              help="GPUs each worker needs (0 = CPU, use the gloo backend). Locally the request is "
                   "checked against this machine's GPUs; workers see all of them and pick one by LOCAL_RANK.")
    @argument("--profile", default=None, metavar="NAME",
              help="A GPU profile of the hub (hub backend only).")
    @argument("--experiment", default=None, metavar="NAME",
              help="MLflow experiment of the run (created if missing). Default: $MLFLOW_EXPERIMENT_NAME, "
                   "else MLflow's 'Default' experiment.")
    @argument("--run-name", default=None, metavar="NAME",
              help="Name of the MLflow run (default: a generated name).")
    @argument("--env", action="append", default=[], metavar="KEY=VALUE",
              help="Environment variable for every worker; repeat for more. RANK, WORLD_SIZE, MASTER_*, "
                   "MLFLOW_* and HUBML_JOB_ID are set by the launcher and hubml and cannot be overridden.")
    @argument("--timeout", default=None, metavar="DURATION",
              help=f"Kill the job after this long: {DURATION_EXAMPLES}. Default: no limit.")
    @argument("--no-wait", action="store_true",
              help="Return once the job started; follow it with %%train_logs JOB --follow and %%train_status.")
    @argument("--backend", default=None, metavar="NAME",
              help="auto (default), local or hub.")
    @cell_magic
    @user_errors
    def train(self, line: str, cell: str) -> None:
        """Run the cell as a distributed training job (PyTorch DDP) and stream its output.

        The cell is shipped as a standalone Python script and started once per
        worker by PyTorch's launcher (``python -m torch.distributed.run
        --nproc-per-node N``), which sets RANK, LOCAL_RANK, WORLD_SIZE,
        MASTER_ADDR and MASTER_PORT: call
        ``torch.distributed.init_process_group("gloo")`` (or "nccl" on GPUs).

        What is carried into the workers: the cell's text, the kernel's
        environment variables (plus --env), its working directory (the cell
        runs there, and it is on sys.path, so modules next to the notebook
        import) and its Python interpreter. What is NOT carried: the notebook's
        variables, imports and functions from other cells -- each worker is a
        fresh interpreter, so import everything you use inside the cell and
        load data from files.

        MLflow: the magic creates the run before the workers start and gives
        them MLFLOW_TRACKING_URI, MLFLOW_RUN_ID and MLFLOW_EXPERIMENT_ID, so
        ``mlflow.start_run()`` in a worker (usually rank 0 only) logs params,
        metrics and the model into that run. %register_model without --run
        registers from it.

        Output: each worker's lines appear as they are written, prefixed with
        the rank ("[1] ..."), with a panel of state, elapsed time, workers and
        the latest metrics with a live plot (text only without a widget
        frontend). If a worker fails, the others are stopped and the cell
        raises an error naming the rank, its exit code and the end of its log.
        Interrupting the cell (Ctrl-C / the stop button) stops every worker.

        Jobs are recorded outside the kernel (local backend: $HUBML_HOME/jobs),
        so %jobs, %train_status and %train_logs work after a kernel restart.

        Example::

            %%train --workers 2 --experiment iris --env LR=0.05
            import os, torch, torch.distributed as dist, mlflow
            dist.init_process_group("gloo")
            ...
        """
        args = parse_line(self.train, line)
        spec = train_spec(args, cell)
        backend = _backend(args.backend)
        status = backend.submit(spec)
        SESSION.last_job_id = status.id
        SESSION.last_run_id = status.run_id
        if args.no_wait:
            print(live.start_line(status, watching=False))
            print(f"Running in the background. Follow: %train_logs {status.id} --follow · "
                  f"status: %train_status {status.id} · stop: %train_cancel {status.id}")
            return None
        live.watch(backend, status.id)
        return None

    @magic_arguments()
    @argument("--backend", default=None, metavar="NAME", help="auto (default), local or hub.")
    @line_magic
    @user_errors
    def jobs(self, line: str) -> None:
        """List your training jobs, newest first (also those of earlier kernels)."""
        args = parse_line(self.jobs, line)
        jobs = _backend(args.backend).jobs()
        if not jobs:
            print("No training jobs yet: run a %%train cell.")
            return
        print(jobs_table(jobs))

    @magic_arguments()
    @argument("job", nargs="?", default=None, metavar="JOB", help="Job id (default: the last job).")
    @argument("--backend", default=None, metavar="NAME", help="auto (default), local or hub.")
    @line_magic
    @user_errors
    def train_status(self, line: str) -> None:
        """Show where a training job stands: state, workers, elapsed time, MLflow run, failure."""
        args = parse_line(self.train_status, line)
        backend = _backend(args.backend)
        status = backend.job(_job_or_last(backend, args.job))
        print(status_text(status))

    @magic_arguments()
    @argument("job", nargs="?", default=None, metavar="JOB", help="Job id (default: the last job).")
    @argument("--follow", "-f", action="store_true",
              help="Keep printing new lines until the job ends (Ctrl-C stops following, not the job).")
    @argument("--rank", type=int, default=None, metavar="R", help="Only the lines of this rank.")
    @argument("--backend", default=None, metavar="NAME", help="auto (default), local or hub.")
    @line_magic
    @user_errors
    def train_logs(self, line: str) -> None:
        """Print a training job's log, every line prefixed with its rank."""
        args = parse_line(self.train_logs, line)
        backend = _backend(args.backend)
        job_id = _job_or_last(backend, args.job)
        status = backend.job(job_id)
        if args.rank is not None and not 0 <= args.rank < status.workers:
            raise InvalidRequest(
                f"--rank {args.rank} does not exist in job {job_id}: its ranks are 0 to {status.workers - 1}."
            )
        if args.follow:
            live.follow_logs(backend, job_id, rank=args.rank)
            return
        cursor: Any = None
        while True:
            chunk = backend.read_logs(job_id, cursor)
            live.print_lines(chunk.lines, rank=args.rank)
            if not chunk.lines or chunk.next_cursor == cursor:
                break
            cursor = chunk.next_cursor

    @magic_arguments()
    @argument("job", metavar="JOB", help="Job id (see %%jobs).")
    @argument("--backend", default=None, metavar="NAME", help="auto (default), local or hub.")
    @line_magic
    @user_errors
    def train_cancel(self, line: str) -> None:
        """Stop every worker of a training job (its MLflow run is marked KILLED)."""
        args = parse_line(self.train_cancel, line)
        backend = _backend(args.backend)
        before = backend.job(args.job)
        if before.state.finished:
            print(f"Job {before.id} had already ended ({before.state.value}); nothing to stop.")
            return
        status = backend.cancel(args.job)
        print(f"Job {status.id}: {status.state.value}. {status.message}".strip())


# -- pure rendering -----------------------------------------------------------
def jobs_table(jobs: list[JobStatus]) -> str:
    rows = [("JOB", "STATE", "WORKERS", "CREATED", "ELAPSED", "EXPERIMENT", "RUN")]
    for s in jobs:
        rows.append((
            s.id, s.state.value, str(s.workers), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)),
            live.format_elapsed(s.elapsed) if s.elapsed is not None else "-",
            s.experiment or "-", s.run_id or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def status_text(status: JobStatus) -> str:
    lines = [
        f"Job {status.id}: {status.state.value} ({status.backend} backend)",
        f"  workers: {status.workers}" + (f" × {status.gpus_per_worker} GPU" if status.gpus_per_worker else ""),
        f"  created: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status.created))}",
        f"  elapsed: {live.format_elapsed(status.elapsed) if status.elapsed is not None else '-'}",
        f"  MLflow:  run {status.run_id} ({status.run_name}) in experiment {status.experiment!r}",
    ]
    if status.worker_states:
        lines.append("  ranks:   " + ", ".join(
            f"{w.rank} {w.state.value}" + (f" (exit {w.exit_code})" if w.exit_code not in (None, 0) else "")
            for w in status.worker_states))
    if status.failed_rank is not None:
        lines.append(f"  failed:  rank {status.failed_rank}, exit code {status.exit_code}")
    if status.message:
        lines.append(f"  {status.message}")
    return "\n".join(lines)
