"""The embedded default backend: everything on this machine, nothing to install.

Workers are processes started by ``torch.distributed.run``; tracking and the
registry go to a local MLflow store; models are served by ``mlflow models serve``.

``LocalBackend`` is resolved lazily (PEP 562 ``__getattr__``) so that the job
supervisor, which imports the small pure ``console`` module from this package,
does not pay for importing the backend and its dependencies on every job start.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LocalBackend"]


def __getattr__(name: str) -> Any:
    if name == "LocalBackend":
        from hubml.magics.local.backend import LocalBackend

        return LocalBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
