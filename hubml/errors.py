"""Exceptions shared by every part of hubml.

Each entry point translates them at its edge: the magics turn ``InvalidRequest``
into IPython's ``UsageError`` (one paragraph, no traceback), the hub service into
HTTP 400/403/404/409, the spawner into a refused spawn. Keeping one hierarchy
means a validation written once (in a pure function) reads the same everywhere.
"""

from __future__ import annotations


class HubMLError(Exception):
    """Base class of every error hubml raises on purpose."""


class InvalidRequest(HubMLError, ValueError):
    """The caller asked for something malformed or not allowed.

    The message is a complete paragraph for a human: what was wrong and how to
    fix it. Raised *before* anything is created, so nothing is left behind.
    """


class NotFound(HubMLError, LookupError):
    """A job, run, model, version, alias or deployment that does not exist (for this user)."""


class Forbidden(HubMLError):
    """The object exists but belongs to someone else, or policy refuses it."""


class Conflict(HubMLError):
    """The request clashes with the current state (a name in use, a job already finished)."""


class BackendError(HubMLError):
    """Something outside hubml failed: a process, MLflow, the hub service, Kubernetes.

    ``next_step`` tells the user what to do about it; IPython shows exceptions
    that define ``_render_traceback_`` without the traceback wall, so the cell
    prints what failed and the next step only.
    """

    def __init__(self, message: str, next_step: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.next_step = next_step
        self.detail = detail

    def _render_traceback_(self) -> list[str]:
        lines = [f"{type(self).__name__}: {self.message}"]
        if self.detail:
            lines += ["", self.detail.rstrip()]
        if self.next_step:
            lines += ["", f"Next step: {self.next_step}"]
        return lines

    def __str__(self) -> str:
        text = self.message
        if self.next_step:
            text += f" Next step: {self.next_step}"
        return text


class JobFailed(BackendError):
    """A training job ended in failure; names the rank, its exit code and its log tail."""

    def __init__(self, message: str, rank: int | None = None, exit_code: int | None = None,
                 log_tail: str = "", next_step: str = "") -> None:
        super().__init__(message, next_step=next_step, detail=log_tail)
        self.rank = rank
        self.exit_code = exit_code
        self.log_tail = log_tail


class JobCancelled(BackendError):
    """A training job was stopped before it ended (interrupt, ``%train_cancel``, ``--timeout``)."""
