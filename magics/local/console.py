"""Reading what ``torch.distributed.run`` writes to its console (pure, no I/O).

The local backend starts torchrun with ``--tee 3`` and
``--log-line-prefix-template "[${rank}]:"``, so every worker line reaches
torchrun's console prefixed with the worker's global rank, in the order they
were written, stdout and stderr together; and with ``--event-log-handler
console`` so torchrun reports each worker's start (with its pid) and end (with
its exit code) as one JSON line. Both the kernel (log streaming) and the
supervisor (worker states, which rank failed) parse that one file with these
functions, so there is a single reading of torchrun's output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from hubml.jobs import LogLine

#: The ``--log-line-prefix-template`` handed to torchrun; ``RANK_LINE`` reads it back.
LINE_PREFIX_TEMPLATE = "[${rank}]:"
RANK_LINE = re.compile(r"^\[(\d+)\]:(.*)$", re.S)
_EVENT_START = '{"name": "torchelastic.worker.status.'
LAUNCHER = -1  # pseudo-rank of torchrun's own lines

#: Exit codes of workers torchrun stopped itself after another one failed: SIGTERM
#: first, SIGKILL only for those still alive after --shutdown-timeout.
_TERMINATED = {-15, 143}
_KILLED = {-9, 137}


@dataclass(frozen=True)
class WorkerEvent:
    """One ``torchelastic.worker.status.*`` event about one worker."""

    state: str          # START, SUCCEEDED, FAILED, ...
    rank: int
    pid: int | None
    exit_code: int | None


def split_complete(data: bytes, final: bool = False) -> tuple[list[str], int]:
    """Complete lines in ``data`` and how many bytes they span.

    A trailing partial line is left for the next read unless ``final`` (the
    job ended and nothing more will be appended).
    """
    end = len(data) if final else data.rfind(b"\n") + 1
    if end <= 0:
        return [], 0
    text = data[:end].decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines], end


def parse_line(line: str) -> LogLine | WorkerEvent | None:
    """A worker's line, a worker event, or ``LogLine(LAUNCHER, ...)`` for torchrun's own output."""
    match = RANK_LINE.match(line)
    if match:
        return LogLine(int(match.group(1)), match.group(2))
    if line.startswith(_EVENT_START):
        return parse_event(line)
    if line.startswith('{"name": "torchelastic.'):
        return None  # agent-level events (rendezvous, ...): no worker information
    return LogLine(LAUNCHER, line)


def parse_event(line: str) -> WorkerEvent | None:
    try:
        event = json.loads(line)
        meta = event["metadata"]
        if event.get("source") != "WORKER" or meta.get("global_rank") is None:
            return None
        inner = json.loads(meta.get("metadata") or "{}")
        codes = inner.get("exit_code") or [None]
        pid = meta.get("worker_id")
        return WorkerEvent(
            state=str(meta.get("state") or event["name"].rsplit(".", 1)[-1]),
            rank=int(meta["global_rank"]),
            pid=int(pid) if pid not in (None, "") else None,
            exit_code=codes[0] if isinstance(codes, list) else codes,
        )
    except (ValueError, KeyError, TypeError):
        return None


def root_cause(events: list[WorkerEvent]) -> WorkerEvent | None:
    """The worker whose failure ended the job.

    torchrun stops the remaining workers with SIGTERM once one fails (and
    SIGKILLs those that outlive ``--shutdown-timeout``), so the cause is the
    first failure with another exit code; a worker killed by SIGKILL (e.g. the
    out-of-memory killer) comes next, then whatever failed first.
    """
    failed = [e for e in events if e.state == "FAILED"]
    for wanted in (lambda c: c not in _TERMINATED | _KILLED, lambda c: c in _KILLED, lambda c: True):
        for event in failed:
            if wanted(event.exit_code):
                return event
    return None


def describe_exit(code: int | None) -> str:
    """``3`` → ``exit code 3``; ``-9`` → ``signal 9 (SIGKILL)``."""
    if code is None:
        return "an unknown exit code"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"exit code {code} (killed by {name})"
    return f"exit code {code}"
