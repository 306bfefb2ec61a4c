"""The training job: what a user asks for (``TrainSpec``) and what it became (``JobStatus``).

Both backends speak these types; the local backend stores them as JSON beside the
logs, the hub service sends them over its REST API. ``to_dict``/``from_dict`` are
the wire and disk format, so they stay plain JSON types.
"""

from __future__ import annotations

import dataclasses
import enum
import math
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
        if len(self.code.encode()) > MAX_CODE_BYTES:
            raise InvalidRequest(
                f"The cell is {len(self.code.encode()) // 1024} KiB; at most {MAX_CODE_BYTES // 1024} KiB "
                f"can be shipped to the workers. Move large code into a module in your home directory "
                f"and import it from the cell."
            )
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
