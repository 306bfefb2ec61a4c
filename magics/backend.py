"""The seam between the magics and where work runs.

``%%train``, ``%register_model``, ``%deploy`` and friends only ever talk to a
``Backend``. Two implementations exist: ``local`` (worker processes started by
``torch.distributed.run``, a local MLflow store, a local model server) and
``hub`` (the hubml hub service, which creates Kubernetes objects). Because the
magics' polling loop, rendering and error handling are written once against this
interface, both backends give the same experience.

Every method validates its input through the shared domain model (``hubml.jobs``,
``hubml.models``) *before* creating anything, and raises the ``hubml.errors``
hierarchy: ``InvalidRequest`` (shown as a ``UsageError``), ``NotFound``,
``Conflict``, ``BackendError`` (shown with its next step).
"""

from __future__ import annotations

import abc
from typing import Any

from hubml.jobs import JobStatus, LogChunk, TrainSpec
from hubml.models import DeploySpec, DeploymentInfo, ModelVersionInfo, RegisteredModelInfo, RegisterRequest


class TrainingBackend(abc.ABC):
    """Runs ``%%train`` jobs and keeps their record outside the kernel's memory."""

    name: str = "abstract"

    @abc.abstractmethod
    def submit(self, spec: TrainSpec) -> JobStatus:
        """Create the MLflow run, start the workers, return at once (state pending/running)."""

    @abc.abstractmethod
    def job(self, job_id: str) -> JobStatus:
        """Current status; raises ``NotFound`` for an unknown id."""

    @abc.abstractmethod
    def jobs(self) -> list[JobStatus]:
        """Every job this user has, newest first, including those of earlier kernels."""

    @abc.abstractmethod
    def read_logs(self, job_id: str, cursor: Any = None) -> LogChunk:
        """Lines written since ``cursor`` (``None`` = from the start), without blocking."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> JobStatus:
        """Stop every worker of the job; idempotent on a finished job."""

    @abc.abstractmethod
    def run_metrics(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        """Metric history of an MLflow run, ``{key: [(step, value), ...]}``, for the live plot."""


class ModelBackend(abc.ABC):
    """Registers models from runs and serves them."""

    name: str = "abstract"

    @abc.abstractmethod
    def register_model(self, request: RegisterRequest) -> ModelVersionInfo: ...

    @abc.abstractmethod
    def models(self) -> list[RegisteredModelInfo]: ...

    @abc.abstractmethod
    def deploy(self, spec: DeploySpec, wait: float | None = None) -> DeploymentInfo:
        """Serve a model version; with ``wait`` seconds, return once it answers predictions."""

    @abc.abstractmethod
    def deployments(self) -> list[DeploymentInfo]: ...

    @abc.abstractmethod
    def undeploy(self, name: str) -> None: ...

    @abc.abstractmethod
    def promote(self, name: str) -> DeploymentInfo:
        """The deployment's canary takes all traffic and becomes its stable version."""

    @abc.abstractmethod
    def rollback(self, name: str) -> DeploymentInfo:
        """The deployment's stable version takes all traffic again; its canary goes."""

    @abc.abstractmethod
    def predict(self, name: str, data: Any) -> Any:
        """Send ``data`` (a list of rows, a dict of columns, or a DataFrame) to a deployment."""


class Backend(TrainingBackend, ModelBackend, abc.ABC):
    """Both halves; what ``hubml.magics`` holds as the session's backend."""
