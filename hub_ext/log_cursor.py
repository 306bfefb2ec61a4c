"""Where a reader of a training job's worker logs stands, and how to go on from there (pure, no I/O).

Why a cursor of timestamps: the only way into a container log that the
Kubernetes API offers is ``GET pods/<pod>/log`` with ``sinceTime``,
``timestamps``, ``tailLines`` and ``limitBytes``; there is no byte offset.
Counting lines from the start (as a first version did) means reading the
whole log on every poll (quadratic over a long job) and stopping at a size
cap. So each rank's position is the log's own timestamp of the last line
handed out, and a poll asks for ``sinceTime`` = that second (the API server
passes ``sinceTime`` on to the kubelet at second precision, RFC 3339) with
``timestamps=true``; the lines of that second that were handed out already are
skipped by (timestamp, how many lines with exactly that timestamp). The
kubelet (``k8s.io/cri-client/pkg/logs``, which kwok uses too) filters records
by ``!timestamp.Before(since)``, prefixes each line with the timestamp of its
first record (``RFC3339NanoFixed``) and cuts the answer at ``limitBytes``,
possibly mid-line, so one poll is bounded and the next goes on from there.

Each position also names the pod (uid, creation time): when a rank's worker
is replaced by a new pod (a Job's ``backoffLimit``), the new pod's log starts
from its first line and what the old pod showed stays shown.

The cursor travels through clients as an opaque string; ``parse_cursor``
refuses anything it did not write in a form a client can act on.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, replace

from hubml.errors import InvalidRequest
from hubml.jobs import MAX_WORKERS

#: what one rank's read asks for beyond what it re-reads of the boundary second
CHUNK_BYTES = 1024 * 1024
#: a single line longer than this (after a retry) is handed out cut, so that a reader never stalls on it
MAX_LINE_BYTES = 16 * 1024 * 1024
#: at most this much of the boundary second is re-read (a cursor is client input; a worker writing more
#: in one second loses the lines of that second past it, which ``advance`` then skips as seen)
MAX_REREAD_BYTES = 64 * 1024 * 1024

NS = 1_000_000_000
_ENTRY = r"[0-9]{1,4}\.[0-9a-z]{1,8}\.[0-9]{1,11}\.[0-9]{1,19}\.[0-9]{1,9}\.[0-9]{1,12}"
#: the OpenAPI pattern of a cursor (``openapi.py``); bounded digits keep every value a valid time
CURSOR_PATTERN = rf"^({_ENTRY}(,{_ENTRY})*)?$"
CURSOR_MAX_LENGTH = 32768
#: what the OpenAPI document promises for the query parameter: a proxy in front (configurable-http-proxy,
#: node's 16 KiB header limit) resets requests whose URL is longer, so clients are told 4096 (a cursor is
#: about 55 characters per worker: longer ones, of jobs with more than ~70 workers, are still accepted)
CURSOR_DOCUMENTED_LENGTH = 4096
_CURSOR_RE = re.compile(CURSOR_PATTERN, re.ASCII)
_STAMP_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", re.ASCII)


def pod_key(uid: str) -> str:
    """The part of a pod's uid a cursor keeps: enough to tell a rank's pods apart, short enough that
    a 256-worker cursor stays a small query string."""
    return "".join(c for c in str(uid).lower() if c.isascii() and c.isalnum())[:8] or "0"


@dataclass(frozen=True)
class RankPosition:
    """How far one rank's log was read: in pod ``uid`` (its ``pod_key``; created at ``created``, epoch seconds), the
    last line handed out had timestamp ``at`` (ns since the epoch, 0 = none yet) and was the
    ``count``-th line with exactly that timestamp; ``size`` bytes of the timestamped log lie from
    the start of that second through it (what the next read re-reads, so its ``limitBytes``)."""

    uid: str
    created: int
    at: int = 0
    count: int = 0
    size: int = 0

    @property
    def reread(self) -> int:
        """How much of the boundary second the next read repeats (bounded, whatever a client sent)."""
        return min(self.size, MAX_REREAD_BYTES)

    @property
    def since(self) -> str | None:
        """``sinceTime`` for the next read: the second of ``at`` (the API's precision), None = from the start."""
        return rfc3339_second(self.at // NS) if self.at else None


@dataclass(frozen=True)
class StampedLine:
    at: int  # ns since the epoch (the timestamp of the line's first record)
    text: str
    size: int  # bytes in the timestamped answer, newline included


def parse_cursor(cursor: str | None) -> dict[int, RankPosition]:
    """The client's cursor -> ``{rank: RankPosition}``; ``None``/``""`` = from the start of every rank."""
    if cursor in (None, ""):
        return {}
    if not isinstance(cursor, str) or len(cursor) > CURSOR_MAX_LENGTH or not _CURSOR_RE.fullmatch(cursor):
        raise InvalidRequest(
            f"cursor {str(cursor)[:80]!r} is not a log cursor of this service; pass back the next_cursor of "
            f"the previous answer unchanged, or leave cursor out to read every worker's log from the start."
        )
    out: dict[int, RankPosition] = {}
    for part in cursor.split(","):
        rank, uid, created, at, count, size = part.split(".")
        if int(rank) in out:
            raise InvalidRequest(
                f"cursor names rank {int(rank)} twice; pass back the next_cursor of the previous answer "
                f"unchanged, or leave cursor out to read from the start."
            )
        if int(rank) >= MAX_WORKERS:
            raise InvalidRequest(f"cursor names rank {int(rank)}, but a job has at most {MAX_WORKERS} workers; "
                                 f"pass back the next_cursor of the previous answer unchanged, or leave cursor "
                                 f"out to read from the start.")
        out[int(rank)] = RankPosition(uid, int(created), int(at), int(count), int(size))
    return out


def format_cursor(positions: dict[int, RankPosition]) -> str:
    return ",".join(f"{r}.{p.uid}.{p.created}.{p.at}.{p.count}.{p.size}" for r, p in sorted(positions.items()))


def complete_lines(text: str, final: bool) -> list[str]:
    """The lines of a container log, as the local backend splits torchrun's console.

    While the container runs, a last line without its newline is still being
    written (or the runtime split a long one): handing it out now would hand
    out half a line and skip the rest. Only ``\\n`` ends a line
    (``str.splitlines`` would also split on ``\\r`` progress bars and other
    separators).
    """
    if not text:
        return []
    lines = text.split("\n")
    last = lines.pop()  # "" when the text ends with a newline
    if final and last:
        lines.append(last)
    return [line.rstrip("\r") for line in lines]


def parse_timestamp(stamp: str) -> int | None:
    """An RFC 3339 time with up to nanoseconds (what ``timestamps=true`` prefixes) -> ns since the epoch."""
    m = _STAMP_RE.fullmatch(stamp)
    if not m:
        return None
    try:
        seconds = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
    zone = m.group(3)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * NS + int((m.group(2) or "0").ljust(9, "0"))


def rfc3339_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def created_seconds(stamp: str | None) -> int:
    """A pod's ``creationTimestamp`` (RFC 3339, seconds) -> epoch seconds; 0 when missing."""
    at = parse_timestamp(stamp or "")
    return at // NS if at else 0


def stamped_lines(raw: bytes, *, final: bool, truncated: bool) -> list[StampedLine]:
    """The lines of a ``timestamps=true`` answer, each with its timestamp.

    ``truncated`` (the answer reached ``limitBytes``): the last piece may be cut
    anywhere, so it waits for the next read even once the container ended. A
    line without a timestamp (not sent by a kubelet, but possible from other
    log backends) takes the one before it, so the cursor degrades to counting.
    """
    if truncated:
        cut = raw.rfind(b"\n") + 1
        raw, final = raw[:cut], False
    out: list[StampedLine] = []
    previous = 0
    for line in complete_lines(raw.decode("utf-8", "replace"), final):
        stamp, sep, text = line.partition(" ")
        at = parse_timestamp(stamp) if sep else None
        if at is None:
            at, text = previous, line
        previous = at
        out.append(StampedLine(at, text, len(line.encode("utf-8")) + 1))
    return out


def advance(position: RankPosition, lines: list[StampedLine]) -> tuple[list[str], RankPosition]:
    """The lines of a read from ``position.since`` not handed out yet, and the position after them.

    The read starts at the second of ``position.at``, so it repeats the lines
    handed out from that second on: new lines start after the ``count``-th line
    stamped exactly ``position.at``. Should that line not be there any more
    (the runtime rotated the file away), lines stamped later than it are new.
    """
    start = 0
    if position.count:
        seen = 0
        for i, line in enumerate(lines):
            if line.at == position.at:
                seen += 1
                if seen == position.count:
                    start = i + 1
                    break
        else:
            start = next((i for i, line in enumerate(lines) if line.at > position.at), len(lines))
    elif position.at:
        start = next((i for i, line in enumerate(lines) if line.at >= position.at), len(lines))
    new = lines[start:]
    if not new:
        return [], position
    last = new[-1].at
    second = last // NS * NS
    count = sum(1 for line in lines if line.at == last)
    size = sum(line.size for line in lines if line.at >= second)
    return [line.text for line in new], replace(position, at=last, count=count, size=size)


def cut_line(raw: bytes, position: RankPosition, limit: int) -> tuple[list[str], RankPosition]:
    """A read cut at ``limit`` bytes without one new complete line: hand out the cut line, marked,
    and go on from the next second.

    Why: no read can end a line longer than ``limitBytes``, so the rank would
    stall for good; and only ``sinceTime`` can step over such a line without
    reading all of it. The rest of that line, and whatever else the worker
    wrote in that second, are not shown (the marker says so).
    """
    shown, after = advance(position, stamped_lines(raw + b"\n", final=False, truncated=False))
    if not shown:
        return [], position
    shown[-1] += f" [... line cut at {limit} bytes; the rest of it and of that second's output is not shown]"
    return shown, replace(after, at=(after.at // NS + 1) * NS, count=0, size=0)
