"""The model magics from plain Python: ``from hubml.magics import api``.

The same operations as ``%register_model``, ``%models``, ``%deploy``,
``%deployments``, ``%undeploy`` and ``%predict``, for scripts, tests and
notebook code that wants the objects rather than printed lines. They raise the
``hubml.errors`` hierarchy (``InvalidRequest``, ``NotFound``, ``Conflict``,
``BackendError``); the magics are thin wrappers that print and turn those into
``UsageError``.
"""

from __future__ import annotations

from typing import Any

from hubml import names
from hubml.errors import InvalidRequest
from hubml.magics.session import SESSION
from hubml.models import (
    DeploySpec,
    DeploymentInfo,
    ModelRef,
    ModelVersionInfo,
    RegisteredModelInfo,
    RegisterRequest,
)

__all__ = ["register_model", "models", "deploy", "deployments", "undeploy", "predict", "promote", "rollback"]


def register_model(name: str, run_id: str | None = None, *, artifact_path: str = "model",
                   alias: str | None = None, tags: dict[str, str] | None = None,
                   backend: str | None = None) -> ModelVersionInfo:
    """Register the model that run ``run_id`` logged (default: the last ``%%train`` run of this kernel)."""
    if not name:
        raise InvalidRequest(
            "Give the registered model a name: --name NAME (for example --name iris-clf); versions accumulate "
            "under it."
        )
    run = run_id or SESSION.last_run_id
    if not run:
        raise InvalidRequest(
            "There is no run to register: this kernel has not finished a %%train yet. Run %%train first, or "
            "pass --run RUN_ID (the id %%train printed, or one from the MLflow UI)."
        )
    request = RegisterRequest(name=name, run_id=str(run).strip(), artifact_path=artifact_path or "model",
                              alias=alias, tags=dict(tags or {})).validate()
    return SESSION.backend(backend).register_model(request)


def models(*, backend: str | None = None) -> list[RegisteredModelInfo]:
    """Every registered model with its versions and aliases."""
    return SESSION.backend(backend).models()


def default_deployment_name(ref: ModelRef) -> str:
    """A deployment is named after its model unless ``--name`` says otherwise."""
    candidate = ref.name
    try:
        return names.dns_label(candidate, "Deployment name")
    except InvalidRequest:
        raise InvalidRequest(
            f"Model name {ref.name!r} cannot name a deployment (deployment names are lowercase letters, digits "
            f"and '-', as Kubernetes requires): pass --name, e.g. --name "
            f"{_suggest(ref.name)}."
        ) from None


def deploy(model: str, name: str | None = None, *, port: int | None = None, timeout: float | None = None,
           profile: str | None = None, min_replicas: int = 1, max_replicas: int = 1, canary: int | None = None,
           backend: str | None = None) -> DeploymentInfo:
    """Serve ``model`` (``NAME``, ``NAME@alias`` or ``NAME/version``); returns once it answers.

    Deploying again under the same ``name`` replaces the running server without
    downtime: the new one must answer before the old one stops. ``profile``,
    the replica bounds and ``canary`` (a traffic percentage for the new version)
    need the hub backend; the local one serves exactly one replica.
    """
    spec = deploy_request(model, name, port=port, timeout=timeout, profile=profile,
                          min_replicas=min_replicas, max_replicas=max_replicas, canary=canary)
    return SESSION.backend(backend).deploy(spec, wait=timeout)


def deploy_request(model: str, name: str | None = None, *, port: int | None = None,
                   timeout: float | None = None, profile: str | None = None, min_replicas: int = 1,
                   max_replicas: int = 1, canary: int | None = None) -> DeploySpec:
    """The validated ``DeploySpec`` of a deploy call (pure: nothing is looked up or started)."""
    ref = ModelRef.parse(model)
    spec = DeploySpec(model=ref, name=name if name is not None else default_deployment_name(ref), port=port,
                      profile=profile, min_replicas=min_replicas, max_replicas=max_replicas,
                      canary_percent=canary)
    spec.validate()
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= 3600):
        raise InvalidRequest(f"--timeout must be a number of seconds from 1 to 3600; got {timeout!r}.")
    return spec


def deployments(*, backend: str | None = None) -> list[DeploymentInfo]:
    """Every deployment with its current state (``ready``, ``dead``, ``unresponsive``)."""
    return SESSION.backend(backend).deployments()


def promote(name: str, *, backend: str | None = None) -> DeploymentInfo:
    """Finish a canary rollout forwards: the canary takes all traffic and becomes the stable version."""
    return SESSION.backend(backend).promote(names.dns_label(name, "Deployment name"))


def rollback(name: str, *, backend: str | None = None) -> DeploymentInfo:
    """Finish a canary rollout backwards: the stable version takes all traffic again and the canary goes."""
    return SESSION.backend(backend).rollback(names.dns_label(name, "Deployment name"))


def undeploy(name: str, *, backend: str | None = None) -> None:
    """Stop the deployment's server and forget it."""
    SESSION.backend(backend).undeploy(names.dns_label(name, "Deployment name"))


def predict(name: str, data: Any, *, backend: str | None = None) -> Any:
    """Send ``data`` (rows, a dict of columns, a DataFrame or an array) to deployment ``name``."""
    return SESSION.backend(backend).predict(names.dns_label(name, "Deployment name"), data)


def _suggest(text: str) -> str:
    cleaned = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return cleaned[:63].strip("-") or "my-model"
