"""Where the local backend keeps what must outlive a kernel.

``$HUBML_HOME`` (default ``~/.hubml``) holds ``jobs/<id>/`` (spec, status, one
log file per rank) and ``deployments/<name>.json``. Tracking uses
``$MLFLOW_TRACKING_URI`` when set, else MLflow's own default store, a sqlite
file, resolved to an absolute path once so that workers started from another
directory, and later kernels, find the same runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalHome:
    root: Path
    tracking_uri: str

    @classmethod
    def from_env(cls) -> "LocalHome":
        root = Path(os.environ.get("HUBML_HOME") or Path.home() / ".hubml").expanduser().resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        return cls(root=root, tracking_uri=uri)

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def deployments_dir(self) -> Path:
        return self.root / "deployments"
