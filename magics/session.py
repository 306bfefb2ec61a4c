"""Per-kernel state of the extension: which backend, the last job and run.

Kept tiny on purpose: everything that must survive a kernel restart (jobs, logs,
deployments) lives in the backend's own store, not here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hubml.errors import InvalidRequest
from hubml.magics.backend import Backend

BACKENDS = ("auto", "local", "hub")


@dataclass
class Session:
    backend_name: str = "auto"
    last_job_id: str | None = None
    last_run_id: str | None = None
    _backends: dict[str, Backend] = field(default_factory=dict)

    def backend(self, override: str | None = None) -> Backend:
        """The backend for this call: ``override`` (``--backend``), else the session's choice."""
        name = override or self.backend_name or "auto"
        if name not in BACKENDS:
            raise InvalidRequest(f"--backend must be one of {', '.join(BACKENDS)}; got {name!r}.")
        if name == "auto":
            name = detect_backend()
        if name not in self._backends:
            self._backends[name] = _make_backend(name)
        return self._backends[name]


def detect_backend() -> str:
    """``hub`` inside a JupyterHub single-user server whose hub runs hubml's service, else ``local``."""
    if os.environ.get("JUPYTERHUB_API_TOKEN") and os.environ.get("JUPYTERHUB_API_URL"):
        try:
            from hubml.magics.hub import service_reachable
        except ImportError:
            return "local"
        if service_reachable():
            return "hub"
    return "local"


def _make_backend(name: str) -> Backend:
    if name == "local":
        from hubml.magics.local import LocalBackend

        return LocalBackend()
    from hubml.magics.hub import HubBackend

    return HubBackend()


#: One session per Python process (one kernel = one process).
SESSION = Session()
