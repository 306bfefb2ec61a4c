"""The live view of a training job, the same for every backend.

``watch`` polls the three read-only calls of ``TrainingBackend`` (``job``,
``read_logs``, ``run_metrics``) and hands what changed to a view:

- every worker line is printed as it arrives, prefixed with its rank (``[1] ...``);
- ``WidgetView``: an ipywidgets panel with the state, elapsed time, workers, the
  latest value of every logged metric and a live plot of one of them (the loss
  when there is one; a drop-down picks any other). It is displayed as a MIME
  bundle whose ``text/plain`` part is a one-line summary kept up to date, so a
  frontend without widgets (nbclient, nbconvert, a terminal client) shows a
  readable line instead of ``VBox(children=...)``;
- ``TextView``: plain text only, for plain IPython (no kernel, no comms) or when
  ``HUBML_LIVE_VIEW=text``.

Ctrl-C (a Jupyter interrupt) while watching cancels the job: every worker is
stopped before the cell ends, and the cell raises ``JobCancelled``.

The SVG plot and the summary line are pure functions, so the panel has no
plotting dependency beyond ipywidgets' ``HTML``.
"""

from __future__ import annotations

import html
import math
import os
import sys
import time
from collections import defaultdict, deque
from typing import Any, Protocol

from hubml.errors import JobCancelled, JobFailed
from hubml.jobs import JobState, JobStatus, LogLine

POLL_S = 0.1
METRICS_EVERY_S = 1.0
WIDGET_EVERY_S = 0.5
TAIL_LINES = 20
PREFERRED_METRICS = ("loss", "train_loss", "train/loss", "training_loss", "val_loss")


class View(Protocol):
    def start(self, status: JobStatus) -> None: ...
    def lines(self, lines: list[LogLine]) -> None: ...
    def update(self, status: JobStatus, metrics: dict[str, list[tuple[int, float]]]) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self, status: JobStatus, metrics: dict[str, list[tuple[int, float]]]) -> None: ...


def watch(backend: Any, job_id: str, view: View | None = None, poll: float = POLL_S) -> JobStatus:
    """Follow ``job_id`` until it ends; return its final status or raise why it did not succeed."""
    view = view or make_view()
    tails: dict[int, deque[str]] = defaultdict(lambda: deque(maxlen=TAIL_LINES))
    metrics: dict[str, list[tuple[int, float]]] = {}
    cursor: Any = None
    last_metrics = 0.0
    status = backend.job(job_id)
    view.start(status)
    try:
        while True:
            status = backend.job(job_id)  # before the logs: once finished, the logs are complete
            chunk = backend.read_logs(job_id, cursor)
            cursor = chunk.next_cursor
            for line in chunk.lines:
                tails[line.rank].append(line.text)
            if chunk.lines:
                view.lines(chunk.lines)
            now = time.monotonic()
            if status.run_id and (status.state.finished or now - last_metrics >= METRICS_EVERY_S):
                metrics = _safe_metrics(backend, status.run_id, metrics)
                last_metrics = now
            view.update(status, metrics)
            if status.state.finished and not chunk.lines:
                break
            if not chunk.lines:
                time.sleep(poll)
    except KeyboardInterrupt:
        view.note(f"Interrupted: stopping every worker of {job_id} ...")
        status = _cancel_uninterruptibly(backend, job_id)
        view.close(status, metrics)
        raise JobCancelled(
            f"Interrupted: job {job_id} was cancelled and all its {status.workers} worker(s) stopped.",
            next_step=f"run the cell again to start over; what was logged so far stays in MLflow run {status.run_id}.",
        ) from None
    view.close(status, metrics)
    return raise_for_status(status, tails)


def follow_logs(backend: Any, job_id: str, rank: int | None = None, poll: float = POLL_S,
                out: Any = None) -> JobStatus:
    """Print a job's lines until it ends (``%train_logs --follow``); Ctrl-C stops following only."""
    out = out or sys.stdout
    cursor: Any = None
    said = ""
    try:
        while True:
            status = backend.job(job_id)
            if status.state is JobState.PENDING and status.message and status.message != said:
                # a Pending job has no lines yet: say why it waits, and keep waiting
                said = status.message
                print(f"({job_id} is pending: {status.message})", file=out, flush=True)
            chunk = backend.read_logs(job_id, cursor)
            cursor = chunk.next_cursor
            print_lines(chunk.lines, rank=rank, out=out)
            if status.state.finished and not chunk.lines:
                return status
            if not chunk.lines:
                time.sleep(poll)
    except KeyboardInterrupt:
        print(f"(stopped following {job_id}; the job keeps running)", file=out)
        return backend.job(job_id)


def print_lines(lines: list[LogLine], rank: int | None = None, out: Any = None) -> None:
    out = out or sys.stdout
    text = "".join(f"[{line.rank}] {line.text}\n" for line in lines if rank is None or line.rank == rank)
    if text:
        out.write(text)
        out.flush()


#: what libstdc++ prints when a rank dies in gloo's teardown: a gloo worker thread that
#: still releases its last collective as Python finalizes is made to exit while taking the
#: GIL, inside C++ that may not unwind (SIGABRT). The rank's own code was fine; the ranks
#: did not leave together (bench/gloo_teardown.py measures how often, by how a script ends).
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def raise_for_status(status: JobStatus, tails: dict[int, deque[str]] | None = None) -> JobStatus:
    """Return a succeeded status; raise ``JobFailed``/``JobCancelled`` naming rank, exit code and log tail."""
    tails = tails or {}
    if status.state is JobState.SUCCEEDED:
        return status
    if status.state is JobState.CANCELLED:
        raise JobCancelled(
            f"Job {status.id} was cancelled; its workers were stopped.",
            next_step="run the cell again to start over.",
        )
    tail = ""
    if status.failed_rank is not None:
        lines = list(tails.get(status.failed_rank, []))
        tail = (f"Last {len(lines)} line(s) of rank {status.failed_rank}:\n" + "\n".join(lines)) if lines \
            else f"Rank {status.failed_rank} wrote nothing."
    logs_hint = f"%train_logs {status.id}" + (f" --rank {status.failed_rank}" if status.failed_rank is not None else "")
    next_step = f"fix the cell and run it again; the full log: {logs_hint}."
    if status.failed_rank is None and "--timeout" in status.message:
        next_step = f"raise --timeout (or make the job faster) and run the cell again; its log: {logs_hint}."
    elif any(GLOO_TEARDOWN_ABORT in line for line in tails.get(status.failed_rank, [])):
        next_step = ("this rank aborted while leaving the process group as another rank still ran (gloo's "
                     "teardown); end the cell on every rank with `dist.barrier()` and then "
                     "`dist.destroy_process_group()`, after rank 0's last work (such as logging the model), "
                     f"so that the ranks leave together, and run it again; the full log: {logs_hint}.")
    raise JobFailed(
        f"Training job {status.id} failed. {status.message}".strip(),
        rank=status.failed_rank, exit_code=status.exit_code, log_tail=tail, next_step=next_step,
    )


def _cancel_uninterruptibly(backend: Any, job_id: str) -> JobStatus:
    """Cancel even if the user presses Ctrl-C again while the workers are being stopped."""
    while True:
        try:
            return backend.cancel(job_id)
        except KeyboardInterrupt:
            continue


def _safe_metrics(backend: Any, run_id: str, previous: dict) -> dict:
    try:
        return backend.run_metrics(run_id)
    except KeyboardInterrupt:
        raise
    except Exception:  # a busy tracking store must not end the watch; keep the last values
        return previous


# -- views --------------------------------------------------------------------
def make_view() -> View:
    """A widget panel when the kernel can talk to a widget frontend, else text."""
    mode = os.environ.get("HUBML_LIVE_VIEW", "auto").lower()
    if mode != "text" and _in_kernel():
        try:
            return WidgetView()
        except ImportError:
            pass
    return TextView()


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


class TextView:
    """Lines as they come, one line per state change, a summary at the end."""

    def __init__(self, out: Any = None) -> None:
        self.out = out or sys.stdout
        self._state: JobState | None = None
        self._message = ""

    def start(self, status: JobStatus) -> None:
        self._state, self._message = status.state, status.message
        self.note(start_line(status))
        if status.message and not status.state.finished:
            self.note(f"{status.id}: {status.message}")

    def lines(self, lines: list[LogLine]) -> None:
        print_lines(lines, out=self.out)

    def update(self, status: JobStatus, metrics: dict[str, list[tuple[int, float]]]) -> None:
        if status.state.finished:
            return
        if status.state is not self._state:
            self._state, self._message = status.state, status.message
            self.note(f"{status.id}: {status.state.value}" + (f" ({status.message})" if status.message else ""))
        elif status.message and status.message != self._message:
            # why it still waits (queued, unschedulable, image pull) changed: say so once
            self._message = status.message
            self.note(f"{status.id}: {status.message}")

    def note(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def close(self, status: JobStatus, metrics: dict[str, list[tuple[int, float]]]) -> None:
        self.note(summary_line(status, metrics))


class WidgetView(TextView):
    """The ipywidgets panel plus the text lines (streamed below it)."""

    def __init__(self, out: Any = None) -> None:
        import ipywidgets as w

        super().__init__(out)
        self.header = w.HTML()
        self.table = w.HTML()
        self.choice = w.Dropdown(description="plot", options=[], layout=w.Layout(width="260px"))
        self.plot = w.HTML()
        self.box = w.VBox([self.header, w.HBox([self.table, w.VBox([self.choice, self.plot])])])
        self.choice.observe(lambda _change: self._draw(), names="value")
        self._metrics: dict[str, list[tuple[int, float]]] = {}
        self._status: JobStatus | None = None
        self._last = 0.0
        self._handle: Any = None

    def start(self, status: JobStatus) -> None:
        from IPython.display import display

        self._status = status
        self._render(status)
        self._handle = display(self._bundle(status, {}), raw=True, display_id=True)
        super().start(status)

    def update(self, status: JobStatus, metrics: dict[str, list[tuple[int, float]]]) -> None:
        changed = self._status is None or status.state is not self._status.state
        now = time.monotonic()
        if changed or now - self._last >= WIDGET_EVERY_S or metrics is not self._metrics:
            self._render(status, metrics)
            self._last = now
        if changed and self._handle is not None:
            self._handle.update(self._bundle(status, metrics), raw=True)
        self._status = status  # the panel shows the state: no text line per change

    def close(self, status: JobStatus, metrics: dict[str, list[tuple[int, float]]]) -> None:
        self._render(status, metrics)
        if self._handle is not None:
            self._handle.update(self._bundle(status, metrics), raw=True)  # the summary line

    def _bundle(self, status: JobStatus, metrics: dict) -> dict[str, Any]:
        data = dict(self.box._repr_mimebundle_())
        data["text/plain"] = summary_line(status, metrics)
        return data

    def _render(self, status: JobStatus, metrics: dict | None = None) -> None:
        if metrics is not None:
            self._metrics = metrics
        self.header.value = header_html(status)
        self.table.value = metrics_html(self._metrics)
        keys = sorted(self._metrics)
        if tuple(keys) != tuple(self.choice.options):
            current = self.choice.value
            self.choice.options = keys
            self.choice.value = current if current in keys else default_metric(keys)
        self._draw()

    def _draw(self) -> None:
        key = self.choice.value
        points = self._metrics.get(key, []) if key else []
        self.plot.value = svg_plot(points, title=key or "no metric logged yet")


# -- pure rendering -------------------------------------------------------------
def start_line(status: JobStatus, watching: bool = True) -> str:
    run = f"MLflow run {status.run_id} ({status.run_name}) in experiment {status.experiment!r}" \
        if status.run_id else "no MLflow run"
    line = f"Job {status.id}: {status.workers} worker(s) on the {status.backend} backend, {run}."
    return line + " Ctrl-C / interrupt stops every worker." if watching else line


def summary_line(status: JobStatus, metrics: dict[str, list[tuple[int, float]]] | None = None) -> str:
    parts = [f"Job {status.id}: {status.state.value}", f"{status.workers} worker(s)"]
    if status.elapsed is not None:
        parts.append(f"{format_elapsed(status.elapsed)} elapsed")
    latest = latest_metrics(metrics or {})
    if latest:
        parts.append(", ".join(f"{k}={_fmt(v)}" for k, v in latest.items()))
    if status.run_id:
        parts.append(f"run {status.run_id}")
    return " · ".join(parts)


def latest_metrics(metrics: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    return {key: points[-1][1] for key, points in sorted(metrics.items()) if points}


def default_metric(keys: list[str]) -> str | None:
    for key in PREFERRED_METRICS:
        if key in keys:
            return key
    losses = [k for k in keys if "loss" in k.lower()]
    return (losses or keys or [None])[0]


def format_elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


_STATE_COLOURS = {JobState.PENDING: "#777", JobState.RUNNING: "#1565c0", JobState.SUCCEEDED: "#2e7d32",
                  JobState.FAILED: "#c62828", JobState.CANCELLED: "#ef6c00"}


def header_html(status: JobStatus) -> str:
    colour = _STATE_COLOURS[status.state]
    elapsed = format_elapsed(status.elapsed) if status.elapsed is not None else "-"
    workers = " ".join(
        f"<span title='rank {w.rank}: {w.state.value}'>{w.rank}:{html.escape(w.state.value)}</span>"
        for w in status.worker_states
    ) or str(status.workers)
    run = html.escape(f"{status.run_name or ''} ({status.run_id})") if status.run_id else "-"
    message = f"<div style='color:{colour}'>{html.escape(status.message)}</div>" if status.message else ""
    return (f"<b>{html.escape(status.id)}</b> <span style='color:{colour};font-weight:bold'>"
            f"{status.state.value}</span> · elapsed {elapsed} · workers {workers} · run {run}{message}")


def metrics_html(metrics: dict[str, list[tuple[int, float]]]) -> str:
    latest = latest_metrics(metrics)
    if not latest:
        return "<i>no metrics logged yet</i>"
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{_fmt(v)}</td>"
        f"<td style='color:#777'>step {metrics[k][-1][0]}</td></tr>" for k, v in latest.items()
    )
    return f"<table>{rows}</table>"


def svg_plot(points: list[tuple[int, float]], title: str = "", width: int = 320, height: int = 120) -> str:
    """A dependency-free line plot of ``(step, value)`` points as inline SVG."""
    pts = [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
    label = html.escape(title)
    if not pts:
        return f"<svg width='{width}' height='{height}'><text x='8' y='20' fill='#777'>{label}</text></svg>"
    xs = [s for s, _ in pts]
    ys = [v for _, v in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = 24
    sx = (width - 2 * pad) / ((x1 - x0) or 1)
    sy = (height - 2 * pad) / ((y1 - y0) or 1)
    coords = " ".join(f"{pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}" for x, y in pts)
    return (
        f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>"
        f"<text x='{pad}' y='14' font-size='11'>{label}: {_fmt(ys[-1])} (step {xs[-1]})</text>"
        f"<text x='2' y='{pad + 4}' font-size='9' fill='#777'>{_fmt(y1)}</text>"
        f"<text x='2' y='{height - pad}' font-size='9' fill='#777'>{_fmt(y0)}</text>"
        f"<polyline fill='none' stroke='#1565c0' stroke-width='1.5' points='{coords}'/></svg>"
    )


def _fmt(value: float) -> str:
    return f"{value:.4g}"


__all__ = ["watch", "follow_logs", "raise_for_status", "make_view", "TextView", "WidgetView",
           "svg_plot", "summary_line"]
