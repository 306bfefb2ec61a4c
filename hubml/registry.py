"""MLflow's model registry as hubml uses it: one implementation for both backends.

The local backend talks to its own store (a sqlite file, or whatever
``MLFLOW_TRACKING_URI`` says); the hub service talks to the cluster's tracking
server. The rules are the same, so they live here once: which logged model a
run's artifact path means, what a registered version's source is, how a
``NAME[@alias|/version]`` reference resolves, and how MLflow's errors reach
the user (``NotFound`` naming what exists, ``BackendError`` with a next step).

Ownership is a parameter, not a second implementation: every method takes
``owner``. ``None`` (the local backend: one user, one store) checks nothing;
a hub user's name means the run must carry ``hubml.user = owner`` (written by
the hub service, which the user cannot impersonate), registered models carry
``hubml.owner`` and only that owner lists, extends or resolves them.

The model source: MLflow 3 logs a model as a *logged model* with its own
artifact location. A version is registered with that artifact location as
``source`` (and the logged model's id as ``model_id``), and the logged model is
tagged ``mlflow.modelVersions`` with the version, the link ``mlflow.register_model``
records and MLflow's UI shows. Not ``models:/<model_id>``: MLflow 3.17's SQL registry
store resolves that URI through the process-global tracking URI
(``MlflowClient()`` in ``SqlAlchemyStore.create_model_version``, an MLflow
TODO), so from a client holding an explicit store URI it looks in the wrong
store; the artifact location is what that resolution would have produced, and
what MLflow itself sends where the registry cannot resolve ``models:/``
(``MlflowClient._create_model_version``). The tracking server accepts it
because it lies inside the logged model's location.

``mlflow`` is imported inside the methods so that importing this module (and
``hubml.hub_ext``, which imports it) stays cheap. ``MlflowClient`` is
synchronous; the hub service calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Callable
from typing import Any

from hubml import names
from hubml.errors import BackendError, Forbidden, InvalidRequest, NotFound
from hubml.models import ModelRef, ModelVersionInfo, RegisteredModelInfo, RegisterRequest

TAG_USER = "hubml.user"
TAG_JOB = "hubml.job_id"
TAG_OWNER = "hubml.owner"

_RUN_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")
_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def not_found(e: Exception) -> bool:
    """Whether an ``MlflowException`` means "no such entity" (by its error code, never its wording)."""
    return (getattr(e, "error_code", "") or "") in _NOT_FOUND_CODES


def all_pages(search: Callable[..., Any], **kwargs: Any) -> list:
    """Every item of a paged MLflow search (``search_registered_models`` and friends)."""
    items: list = []
    token = None
    while True:
        page = search(page_token=token, **kwargs) if token else search(**kwargs)
        items.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return items


def quote(value: str) -> str:
    """A value inside single quotes of an MLflow filter string."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def mlflow_message(e: BaseException) -> str:
    """The first line of what MLflow said, without its traceback wall."""
    text = str(getattr(e, "message", e)).strip()
    return text.splitlines()[0][:400] if text else type(e).__name__


def metrics_to_json(metrics: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    return {k: [[s, v] for s, v in pts] for k, pts in metrics.items()}


class Registry:
    """Runs and registered models on one MLflow tracking/registry URI.

    ``unreachable_step`` is the next step a ``BackendError`` names when the
    store fails: the local backend points at ``MLFLOW_TRACKING_URI``, the hub
    at its administrator.
    """

    def __init__(self, tracking_uri: str, *, unreachable_step: str) -> None:
        self.tracking_uri = tracking_uri
        self.unreachable_step = unreachable_step
        self._client_obj = None

    @property
    def client(self):
        if self._client_obj is None:
            from mlflow.tracking import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client_obj

    def store_error(self, e: BaseException) -> BackendError:
        """The one translation of a failing MLflow store into what the user reads."""
        return BackendError(f"The MLflow tracking store {self.tracking_uri} failed: {mlflow_message(e)}",
                            next_step=self.unreachable_step)

    # ------------------------------------------------------------------ runs

    def create_run(self, owner: str, job_id: str, experiment: str | None, run_name: str | None) -> dict[str, str]:
        """Create a hub job's run (experiment default: ``hubml/<owner>``); returns ids for the pods' env."""
        from mlflow.exceptions import MlflowException

        name = experiment or f"hubml/{owner}"
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    exp_id = self.client.create_experiment(name, tags={TAG_OWNER: owner})
                except MlflowException:  # created concurrently
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
            run = self.client.create_run(exp_id, run_name=run_name or job_id,
                                         tags={TAG_USER: owner, TAG_JOB: job_id, "mlflow.user": owner})
        except (MlflowException, OSError) as e:
            raise self.store_error(e) from e
        return {"run_id": run.info.run_id, "experiment_id": exp_id, "experiment": name}

    def end_run(self, run_id: str, status: str) -> None:
        """Mark a run KILLED/FAILED when its job is cancelled or could not be created."""
        with contextlib.suppress(Exception):
            run = self.client.get_run(run_id)
            if run.info.status in ("RUNNING", "SCHEDULED"):
                self.client.set_terminated(run_id, status)

    def run(self, run_id: str, owner: str | None = None):
        """The run, if it exists and (with ``owner``) was made by that user's jobs."""
        from mlflow.exceptions import MlflowException

        missing = (f"Run {run_id!r} does not exist in the tracking store {self.tracking_uri}. Use the run id that "
                   f"%%train printed (or leave --run out to register the last run of this kernel).")
        if not _RUN_ID.match(str(run_id)):
            raise NotFound(missing)
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if not_found(e) or getattr(e, "error_code", "") == "INVALID_PARAMETER_VALUE":
                raise NotFound(missing) from None
            raise self.store_error(e) from None
        if owner is not None and run.data.tags.get(TAG_USER) != owner:
            raise Forbidden(f"Run {run_id!r} was not made by your %%train jobs; you can only use your own runs.")
        return run

    def run_metrics(self, run_id: str, owner: str | None = None) -> dict[str, list[tuple[int, float]]]:
        """Every metric's history, ``{key: [(step, value), ...]}`` in step order."""
        from mlflow.exceptions import MlflowException

        run = self.run(run_id, owner)
        out: dict[str, list[tuple[int, float]]] = {}
        try:
            for key in sorted(run.data.metrics):
                history = self.client.get_metric_history(run_id, key)
                out[key] = [(int(m.step), float(m.value)) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
        except MlflowException as e:
            raise self.store_error(e) from None
        return out

    # ------------------------------------------------------------------ registry

    def model_source(self, run, artifact_path: str) -> tuple[str, str | None]:
        """Where the model of ``run`` at ``artifact_path`` lives, and its logged-model id (MLflow 2: None)."""
        client = self.client
        run_id = run.info.run_id
        logged = [m for m in all_pages(client.search_logged_models, experiment_ids=[run.info.experiment_id],
                                       filter_string=f"name = '{quote(artifact_path)}'")
                  if m.source_run_id == run_id]
        if logged:
            newest = max(logged, key=lambda m: m.creation_timestamp or 0)
            return newest.artifact_location, newest.model_id
        # MLflow 2 style: the model files sit in the run's artifacts.
        with contextlib.suppress(Exception):
            if any(a.path.endswith("MLmodel") for a in client.list_artifacts(run_id, artifact_path)):
                return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}", None
        others: list[str] = []
        with contextlib.suppress(Exception):
            others = sorted({m.name for m in client.search_logged_models(
                experiment_ids=[run.info.experiment_id], max_results=200) if m.source_run_id == run_id})
        found = (f"it has models named {', '.join(repr(n) for n in others)}: pass --artifact-path "
                 f"{others[0]}" if others else
                 "it has no logged model at all: log one from rank 0, e.g. "
                 "mlflow.pytorch.log_model(model, name='model', input_example=x[:1])")
        raise NotFound(f"Run {run_id} has no model at artifact path {artifact_path!r}; {found}.")

    def _registered(self, name: str, owner: str | None, verb: str):
        """The registered model ``name`` or None; ``Forbidden`` when another user owns it."""
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(name)
        except MlflowException as e:
            if not_found(e):
                return None
            raise
        if owner is not None and (rm.tags or {}).get(TAG_OWNER) != owner:
            raise Forbidden(f"Model {name!r} is registered by another user; {verb}.")
        return rm

    def register(self, request: RegisterRequest, owner: str | None = None) -> ModelVersionInfo:
        """Add a version under ``request.name`` from the run's logged model; nothing is left on failure."""
        from mlflow.exceptions import MlflowException

        request.validate()
        run = self.run(request.run_id, owner)
        client = self.client
        created = False
        version = None
        try:
            rm = self._registered(request.name, owner, "choose another name")
            source, model_id = self.model_source(run, request.artifact_path)
            if rm is None:
                client.create_registered_model(request.name, tags={TAG_OWNER: owner} if owner else None)
                created = True
            mv = client.create_model_version(name=request.name, source=source, run_id=run.info.run_id,
                                             tags=request.tags or None, model_id=model_id)
            version = mv.version
            if model_id:
                self._link(model_id, request.name, mv.version)
            if request.alias:
                client.set_registered_model_alias(request.name, request.alias, mv.version)
        except (MlflowException, OSError) as e:
            with contextlib.suppress(Exception):  # leave nothing half-registered behind
                if version is not None:
                    client.delete_model_version(request.name, version)
                if created:
                    client.delete_registered_model(request.name)
            raise BackendError(
                f"MLflow refused to register run {request.run_id} as {request.name!r}: {mlflow_message(e)}",
                next_step=self.unreachable_step,
            ) from None
        return ModelVersionInfo(name=request.name, version=int(mv.version), run_id=run.info.run_id, source=source,
                                aliases=[request.alias] if request.alias else [], tags=dict(request.tags))

    def _link(self, model_id: str, name: str, version: str | int) -> None:
        """Record the version on its logged model (tag ``mlflow.modelVersions``), as ``mlflow.register_model`` does.

        The tracking server records it itself; a client on a SQL store directly
        does not, so it is done here, idempotently (an entry already there stays once).
        """
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        entry = {"name": name, "version": str(version)}
        existing = self.client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
        linked = json.loads(existing) if existing else []
        if any(e.get("name") == name and str(e.get("version")) == str(version) for e in linked):
            return
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})

    def _registered_models(self, owner: str | None) -> list:
        search = self.client.search_registered_models
        if owner is None:
            return all_pages(search)
        return all_pages(search, filter_string=f"tags.`{TAG_OWNER}` = '{quote(owner)}'")

    def _versions(self, name: str) -> list:
        return all_pages(self.client.search_model_versions, filter_string=f"name = '{quote(name)}'")

    def models(self, owner: str | None = None) -> list[RegisteredModelInfo]:
        """Registered models (with ``owner``: only theirs), versions in order, aliases on each version."""
        from mlflow.exceptions import MlflowException

        result = []
        try:
            for rm in sorted(self._registered_models(owner), key=lambda r: r.name):
                aliases = {a: int(v) for a, v in (rm.aliases or {}).items()}
                versions = [ModelVersionInfo(name=mv.name, version=int(mv.version), run_id=mv.run_id,
                                             source=mv.source, tags=dict(mv.tags or {}),
                                             aliases=sorted(a for a, n in aliases.items() if n == int(mv.version)))
                            for mv in self._versions(rm.name)]
                result.append(RegisteredModelInfo(name=rm.name, versions=sorted(versions, key=lambda v: v.version),
                                                  aliases=aliases))
        except MlflowException as e:
            raise self.store_error(e) from None
        return result

    def resolve(self, ref: ModelRef, owner: str | None = None) -> ModelVersionInfo:
        """The registered version ``ref`` points to now; ``NotFound`` naming what exists instead."""
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            rm = self._registered(ref.name, owner, "you can only deploy your own")
            if rm is None:
                known = [m.name for m in self._registered_models(owner)][:10]
                hint = f" Registered models: {', '.join(known)}." if known else " No model is registered yet."
                raise NotFound(f"No registered model named {ref.name!r}.{hint} Register one with "
                               f"%register_model --name {ref.name}.")
            versions = sorted(int(v.version) for v in self._versions(ref.name))
            if ref.alias:
                aliases = dict(rm.aliases or {})
                if ref.alias not in aliases:
                    have = ", ".join(f"@{a}" for a in sorted(aliases)) or "none"
                    raise NotFound(
                        f"Model {ref.name!r} has no alias {ref.alias!r} (its aliases: {have}). Set it with "
                        f"%register_model --name {ref.name} --alias {ref.alias}, or deploy {ref.name}/VERSION."
                    )
                number = int(aliases[ref.alias])
            elif ref.version:
                if ref.version not in versions:
                    raise NotFound(f"Model {ref.name!r} has no version {ref.version} (versions: "
                                   f"{', '.join(map(str, versions)) or 'none'}). %models lists them.")
                number = ref.version
            else:
                if not versions:
                    raise NotFound(f"Model {ref.name!r} has no versions yet; register one with %register_model.")
                number = versions[-1]
            mv = client.get_model_version(ref.name, str(number))
        except MlflowException as e:
            raise self.store_error(e) from None
        return ModelVersionInfo(name=mv.name, version=int(mv.version), run_id=mv.run_id, source=mv.source,
                                aliases=sorted(getattr(mv, "aliases", []) or []), tags=dict(mv.tags or {}))

    def storage_uri(self, ref: ModelRef, owner: str | None = None) -> tuple[int, str]:
        """The version ``ref`` points to now and where its files are (KServe's ``storageUri``)."""
        from mlflow.exceptions import MlflowException

        version = self.resolve(ref, owner)
        try:
            uri = self.client.get_model_version_download_uri(ref.name, str(version.version))
        except MlflowException as e:
            raise self.store_error(e) from None
        if not isinstance(uri, str) or not uri:
            raise InvalidRequest(f"Model {ref} has no download location in the registry.")
        return version.version, uri

    def described(self, name: str, version: str, owner: str | None = None) -> dict[str, Any]:
        """One version of the owner's model with its input signature (``null`` when the MLmodel has none)."""
        try:
            names.model_name(name)
        except InvalidRequest:
            raise NotFound(f"No registered model named {name!r}.") from None
        if not re.fullmatch(r"[1-9][0-9]{0,8}", version):
            raise NotFound(f"Model {name!r} has no version {version!r}: versions are whole numbers from 1.")
        info = self.resolve(ModelRef(name=name, version=int(version)), owner)
        return {**info.to_dict(), "signature": self.signature(info.name, info.version)}

    def signature(self, name: str, version: int) -> str | None:
        """The input signature in the version's MLmodel (MLflow's own rendering), or None when it has none.

        Read for error messages only: any failure to read it answers None, so
        the caller's own error is never hidden behind a second one.
        """
        try:
            from mlflow.artifacts import download_artifacts
            from mlflow.models import Model

            uri = self.client.get_model_version_download_uri(name, str(version))
            with tempfile.TemporaryDirectory(prefix="hubml-mlmodel-") as tmp:
                path = download_artifacts(artifact_uri=f"{uri.rstrip('/')}/MLmodel", dst_path=tmp,
                                          tracking_uri=self.tracking_uri)
                signature = Model.load(path).signature
        except Exception:  # noqa: BLE001 - best effort, see the docstring
            return None
        if signature is None or signature.inputs is None:
            return None
        return " ".join(str(signature.inputs).split())
