"""The hub service's side of MLflow: runs for jobs, the model registry, storage URIs.

Why the service (and not the notebook) creates the run: the run id must exist
before the workers start, so that every rank logs into the same run
(``MLFLOW_RUN_ID`` is injected into the pods), and the run carries the
``hubml.user`` tag written by a party the user cannot impersonate. Registering
a model checks that tag, so nobody registers someone else's run, and each
registered model carries ``hubml.owner``, so only its owner adds versions.

``MlflowClient`` is synchronous (HTTP to the tracking server); the service
calls these methods in a thread (``asyncio.to_thread``) to keep its event loop
free.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from hubml.errors import BackendError, Forbidden, InvalidRequest, NotFound
from hubml.models import ModelRef, ModelVersionInfo, RegisteredModelInfo, RegisterRequest

TAG_USER = "hubml.user"
TAG_JOB = "hubml.job_id"
TAG_OWNER = "hubml.owner"


def _not_found(e: Exception) -> bool:
    code = getattr(e, "error_code", "") or ""
    return "RESOURCE_DOES_NOT_EXIST" in code or "does not exist" in str(e).lower() or "not found" in str(e).lower()


def _all_pages(search, **kwargs) -> list:
    out: list = []
    token = None
    while True:
        page = search(page_token=token, **kwargs) if token else search(**kwargs)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


class MlflowRegistry:
    """Runs, metrics and registered models on the tracking server, per hub user."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _down(self, e: Exception) -> BackendError:
        return BackendError(
            f"The MLflow tracking server at {self.tracking_uri} failed: {str(e)[:300]}",
            next_step="retry in a minute; if it persists, tell the hub administrator that MLflow is unreachable.",
        )

    # ------------------------------------------------------------------ runs

    def create_run(self, user: str, job_id: str, experiment: str | None, run_name: str | None) -> dict[str, str]:
        """Create the job's run (experiment default: ``hubml/<user>``); returns ids for the pods' env."""
        from mlflow.exceptions import MlflowException

        name = experiment or f"hubml/{user}"
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    exp_id = self.client.create_experiment(name, tags={TAG_OWNER: user})
                except MlflowException:  # created concurrently
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
            run = self.client.create_run(exp_id, run_name=run_name or job_id,
                                         tags={TAG_USER: user, TAG_JOB: job_id, "mlflow.user": user})
        except MlflowException as e:
            raise self._down(e) from e
        except OSError as e:
            raise self._down(e) from e
        return {"run_id": run.info.run_id, "experiment_id": exp_id, "experiment": name}

    def end_run(self, run_id: str, status: str) -> None:
        """Mark a run KILLED/FAILED when its job is cancelled or could not be created."""
        with contextlib.suppress(Exception):
            run = self.client.get_run(run_id)
            if run.info.status == "RUNNING" or run.info.status == "SCHEDULED":
                self.client.set_terminated(run_id, status)

    def _owned_run(self, user: str, run_id: str):
        from mlflow.exceptions import MlflowException

        if not re.match(r"^[A-Za-z0-9]{1,64}$", str(run_id)):
            raise NotFound(f"Run {run_id!r} does not exist (run ids are 32 hexadecimal characters).")
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if _not_found(e) or getattr(e, "error_code", "") == "INVALID_PARAMETER_VALUE":
                raise NotFound(f"Run {run_id!r} does not exist on the tracking server.") from None
            raise self._down(e) from e
        if run.data.tags.get(TAG_USER) != user:
            raise Forbidden(f"Run {run_id!r} was not made by your %%train jobs; you can only use your own runs.")
        return run

    def run_metrics(self, user: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
        from mlflow.exceptions import MlflowException

        run = self._owned_run(user, run_id)
        out: dict[str, list[tuple[int, float]]] = {}
        try:
            for key in sorted(run.data.metrics):
                history = self.client.get_metric_history(run_id, key)
                out[key] = [(int(m.step), float(m.value)) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
        except MlflowException as e:
            raise self._down(e) from e
        return out

    # ------------------------------------------------------------------ registry

    def _model_source(self, run, artifact_path: str) -> tuple[str, str | None]:
        logged = [m for m in _all_pages(self.client.search_logged_models,
                                        experiment_ids=[run.info.experiment_id],
                                        filter_string=f"name = '{artifact_path}'")
                  if m.source_run_id == run.info.run_id]
        if logged:
            newest = max(logged, key=lambda m: m.creation_timestamp or 0)
            return f"models:/{newest.model_id}", newest.model_id
        with contextlib.suppress(Exception):
            if any(a.path.endswith("MLmodel") for a in self.client.list_artifacts(run.info.run_id, artifact_path)):
                return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}", None
        raise NotFound(
            f"Run {run.info.run_id} has no model at artifact path {artifact_path!r}: log one from rank 0, e.g. "
            f"mlflow.pytorch.log_model(model, name={artifact_path!r}), or pass the right --artifact-path."
        )

    def register(self, user: str, request: RegisterRequest) -> ModelVersionInfo:
        from mlflow.exceptions import MlflowException

        request.validate()
        run = self._owned_run(user, request.run_id)
        created = False
        version = None
        try:
            try:
                rm = self.client.get_registered_model(request.name)
            except MlflowException as e:
                if not _not_found(e):
                    raise
                rm = None
            if rm is not None and (rm.tags or {}).get(TAG_OWNER) != user:
                raise Forbidden(f"Model {request.name!r} is registered by another user; choose another name.")
            source, model_id = self._model_source(run, request.artifact_path)
            if rm is None:
                self.client.create_registered_model(request.name, tags={TAG_OWNER: user})
                created = True
            mv = self.client.create_model_version(name=request.name, source=source, run_id=run.info.run_id,
                                                  tags=request.tags or None, model_id=model_id)
            version = mv.version
            if request.alias:
                self.client.set_registered_model_alias(request.name, request.alias, mv.version)
        except MlflowException as e:
            with contextlib.suppress(Exception):
                if version is not None:
                    self.client.delete_model_version(request.name, version)
                if created:
                    self.client.delete_registered_model(request.name)
            raise self._down(e) from e
        return ModelVersionInfo(name=request.name, version=int(mv.version), run_id=run.info.run_id, source=source,
                                aliases=[request.alias] if request.alias else [], tags=dict(request.tags))

    def models(self, user: str) -> list[RegisteredModelInfo]:
        from mlflow.exceptions import MlflowException

        try:
            registered = [rm for rm in _all_pages(self.client.search_registered_models,
                                                  filter_string=f"tags.`{TAG_OWNER}` = '{_quote(user)}'")]
            result = []
            for rm in sorted(registered, key=lambda r: r.name):
                aliases = {a: int(v) for a, v in (rm.aliases or {}).items()}
                versions = [ModelVersionInfo(name=mv.name, version=int(mv.version), run_id=mv.run_id,
                                             source=mv.source, tags=dict(mv.tags or {}),
                                             aliases=sorted(a for a, n in aliases.items() if n == int(mv.version)))
                            for mv in _all_pages(self.client.search_model_versions,
                                                 filter_string=f"name = '{_quote(rm.name)}'")]
                result.append(RegisteredModelInfo(name=rm.name, versions=sorted(versions, key=lambda v: v.version),
                                                  aliases=aliases))
        except MlflowException as e:
            raise self._down(e) from e
        return result

    def resolve(self, user: str, ref: ModelRef) -> tuple[int, str]:
        """The version ``ref`` points to now, and where its files are (KServe's ``storageUri``)."""
        from mlflow.exceptions import MlflowException

        try:
            try:
                rm = self.client.get_registered_model(ref.name)
            except MlflowException as e:
                if _not_found(e):
                    raise NotFound(f"No registered model named {ref.name!r}; register one with %register_model.") \
                        from None
                raise
            if (rm.tags or {}).get(TAG_OWNER) != user:
                raise Forbidden(f"Model {ref.name!r} is registered by another user; you can only deploy your own.")
            if ref.alias:
                aliases = dict(rm.aliases or {})
                if ref.alias not in aliases:
                    raise NotFound(f"Model {ref.name!r} has no alias {ref.alias!r}.")
                version = int(aliases[ref.alias])
            elif ref.version:
                version = ref.version
                try:
                    self.client.get_model_version(ref.name, str(version))
                except MlflowException as e:
                    if _not_found(e):
                        raise NotFound(f"Model {ref.name!r} has no version {version}.") from None
                    raise
            else:
                versions = [int(v.version) for v in _all_pages(self.client.search_model_versions,
                                                                filter_string=f"name = '{_quote(ref.name)}'")]
                if not versions:
                    raise NotFound(f"Model {ref.name!r} has no versions yet.")
                version = max(versions)
            uri = self.client.get_model_version_download_uri(ref.name, str(version))
        except MlflowException as e:
            raise self._down(e) from e
        if not isinstance(uri, str) or not uri:
            raise InvalidRequest(f"Model {ref} has no download location in the registry.")
        return version, uri


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def metrics_to_json(metrics: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    return {k: [[s, v] for s, v in pts] for k, pts in metrics.items()}
