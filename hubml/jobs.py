"""The training job: what a user asks for (``TrainSpec``) and what it became (``JobStatus``).

Both backends speak these types; the local backend stores them as JSON beside the
logs, the hub service sends them over its REST API. ``to_dict``/``from_dict`` are
the wire and disk format, so they stay plain JSON types.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from hubml import names
from hubml.errors import InvalidRequest

MAX_WORKERS = 256
MAX_GPUS_PER_WORKER = 16
MAX_CODE_BYTES = 512 * 1024  # a ConfigMap holds 1 MiB; leave room for the rest


class JobState(str, enum.Enum):
    PENDING = "pending"      # accepted, workers not all started
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class TrainSpec:
    """A ``%%train`` cell: the code and how to run it.

    Validation happens in ``validate`` (pure), before any backend creates
    anything, so a bad request leaves nothing behind.
    """

    code: str
    workers: int = 1
    gpus_per_worker: int = 0
    profile: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None  # seconds; None = no limit

    def validate(self) -> "TrainSpec":
        if not isinstance(self.code, str) or not self.code.strip():
            raise InvalidRequest(
                "The %%train cell is empty: write the training script in the cell body, below the "
                "%%train line (it runs in each worker as a standalone Python script)."
            )
        size = len(self.code.encode("utf-8", "surrogatepass"))  # a lone surrogate is refused below, by name
        if size > MAX_CODE_BYTES:
            raise InvalidRequest(
                f"The cell is {size // 1024} KiB; at most {MAX_CODE_BYTES // 1024} KiB "
                f"can be shipped to the workers. Move large code into a module in your home directory "
                f"and import it from the cell."
            )
        problem = syntax_problem(self.code)
        if problem:
            raise InvalidRequest(problem)
        _int_in_range("--workers", self.workers, 1, MAX_WORKERS)
        _int_in_range("--gpus-per-worker", self.gpus_per_worker, 0, MAX_GPUS_PER_WORKER)
        if self.profile is not None:
            names.dns_label(self.profile, "Profile")
        if self.experiment is not None and (not self.experiment.strip() or len(self.experiment) > 256):
            raise InvalidRequest("--experiment must be a non-empty name of at most 256 characters.")
        if self.run_name is not None and (not self.run_name.strip() or len(self.run_name) > 250):
            raise InvalidRequest("--run-name must be a non-empty name of at most 250 characters.")
        for key, value in self.env.items():
            names.env_pair(f"{key}={value}")
        if self.timeout is not None:
            if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) \
                    or not math.isfinite(self.timeout) or self.timeout <= 0:
                raise InvalidRequest(
                    f"--timeout must be a positive duration such as 90, 90s, 30m or 2h; got {self.timeout!r}."
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"Unknown field(s) in training spec: {', '.join(unknown)}.")
        return cls(**data)


@dataclass
class WorkerStatus:
    rank: int
    state: JobState = JobState.PENDING
    exit_code: int | None = None


@dataclass
class JobStatus:
    """Where a job stands. ``failed_rank``/``exit_code``/``message`` explain a failure."""

    id: str
    state: JobState
    workers: int
    backend: str
    created: float
    started: float | None = None
    finished: float | None = None
    run_id: str | None = None
    experiment_id: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    profile: str | None = None
    gpus_per_worker: int = 0
    failed_rank: int | None = None
    exit_code: int | None = None
    message: str = ""
    worker_states: list[WorkerStatus] = field(default_factory=list)

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        import time

        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        data["worker_states"] = [
            {"rank": w.rank, "state": w.state.value, "exit_code": w.exit_code} for w in self.worker_states
        ]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobStatus":
        data = dict(data)
        data["state"] = JobState(data["state"])
        data["worker_states"] = [
            WorkerStatus(rank=w["rank"], state=JobState(w["state"]), exit_code=w.get("exit_code"))
            for w in data.get("worker_states", [])
        ]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class LogLine:
    rank: int
    text: str


@dataclass(frozen=True)
class LogChunk:
    """New log lines since ``cursor``; pass ``next_cursor`` back to continue.

    The cursor is opaque to callers (byte offsets per rank locally, a stream
    position on the hub), which lets both backends share one polling loop.
    """

    lines: list[LogLine]
    next_cursor: Any


def _int_in_range(flag: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{flag} must be a whole number from {low} to {high}; got {value!r}.")


#: How much of the offending line a syntax error quotes (a minified line can be huge).
_QUOTED_LINE_CHARS = 100


@functools.lru_cache(maxsize=8)
def syntax_problem(code: str) -> str | None:
    """Why ``code`` would fail to start as a worker's script, or ``None`` if Python accepts it.

    Both backends write the cell unchanged, UTF-8 encoded, to ``train.py`` and run
    it with ``python -m torch.distributed.run``; compiling those bytes here (the
    encoding cookie and byte order mark read as the interpreter reads them, the
    compiler's own checks included) lets a typo be refused before any job,
    process or MLflow run exists instead of failing every worker seconds later.
    Cached because one submit validates the same spec more than once and a
    large cell takes a noticeable part of a second to compile.
    """
    try:
        source = code.encode("utf-8")
    except UnicodeEncodeError as e:
        line, column = _position(code, e.start)
        return (f"The %%train cell holds U+{ord(code[e.start]):04X} at line {line}, column {column}, which is not "
                f"a character (a lone surrogate) and cannot be written into the workers' script: delete it, "
                f"or retype the text around it, and run the cell again.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a SyntaxWarning only warns in the worker
            compile(source, "train.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        return _syntax_message(code, e)
    except (MemoryError, RecursionError):
        return ("The %%train cell nests expressions too deeply for Python to compile it: split the deepest "
                "expression into several statements and run the cell again.")
    return None


def _syntax_message(code: str, error: SyntaxError | ValueError) -> str:
    """One paragraph: where (line, column, the line itself), Python's reason, and the fix."""
    reason = str(getattr(error, "msg", None) or error).rstrip(".")
    if "\0" in code:  # "source code cannot contain null bytes" carries no position
        line, column = _position(code, code.index("\0"))
        return (f"The %%train cell is not valid Python: line {line}, column {column} holds a NUL character "
                f"(U+0000), which Python source cannot contain: delete it (it often comes from pasting binary "
                f"text) and run the cell again.")
    lineno = getattr(error, "lineno", None)
    if not lineno:  # no position: the encoding declaration itself is wrong
        return (f"The %%train cell cannot be read as Python: {reason}. The workers get the cell as UTF-8: "
                f"remove its '# coding:' line (or make it '# coding: utf-8') and run the cell again.")
    text = getattr(error, "text", None)
    if text is None:  # the compiler's own checks ('return' outside function…) do not quote the line
        lines = code.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        text = lines[lineno - 1] if lineno <= len(lines) else ""
    text = text.rstrip("\r\n")
    # SyntaxError.offset counts UTF-8 bytes of the line here (bytes were compiled): report characters
    offset = max(1, int(getattr(error, "offset", None) or 1))
    column = len(text.encode("utf-8")[:offset - 1].decode("utf-8", "ignore")) + 1
    quoted = text.strip()
    if len(quoted) > _QUOTED_LINE_CHARS:  # a window around the column
        start = max(0, min(column - 1 - (len(text) - len(text.lstrip())) - _QUOTED_LINE_CHARS // 2,
                           len(quoted) - _QUOTED_LINE_CHARS))
        end = start + _QUOTED_LINE_CHARS
        quoted = ("…" if start else "") + quoted[start:end] + ("…" if end < len(quoted) else "")
    where = f"line {lineno}, column {column}" + (f" (`{quoted}`)" if quoted else "")
    fix = "fix that line and run the cell again"
    if text.lstrip()[:1] in ("%", "!"):
        fix = ("IPython syntax such as %magics and !shell commands does not work there: run it in a cell of its "
               "own, or use subprocess inside the cell")
    end_mark = "" if reason[-1:] in "?!" else "."
    return (f"The %%train cell is not valid Python: {where}: {reason}{end_mark} Each worker runs the cell as a "
            f"standalone Python script (line 1 is the first line below %%train), so nothing was started: {fix}.")


def _position(code: str, index: int) -> tuple[int, int]:
    """1-based line and column of ``code[index]``, counting lines as Python does (\\n, \\r\\n, \\r)."""
    before = code[:index].replace("\r\n", "\n").replace("\r", "\n")
    return before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
