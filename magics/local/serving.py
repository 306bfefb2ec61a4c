"""The local backend's registry and model serving.

Registry: MLflow's model registry in the local tracking store (``home.tracking_uri``),
through ``MlflowClient``, with aliases (not the deprecated stages).

Serving: each deployment is one ``mlflow models serve --env-manager local``
process on a loopback port, recorded in ``home.deployments_dir/<name>.json`` so
that a later kernel finds it, predicts through it and stops it. A second deploy
of the same name starts the new server, waits until it answers, switches the
record and only then stops the old one, so ``%predict NAME`` never goes dark.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hubml import names
from hubml.errors import BackendError, Conflict, InvalidRequest, NotFound
from hubml.magics.backend import ModelBackend
from hubml.magics.local import model_server
from hubml.magics.local.home import LocalHome
from hubml.magics.local.model_server import ServerProcess
from hubml.models import DeploySpec, DeploymentInfo, ModelRef, ModelVersionInfo, RegisteredModelInfo, RegisterRequest
from hubml.scoring import predictions_from_response, scoring_payload

#: Seconds ``deploy`` waits for a new server to answer when the caller gives no limit.
DEFAULT_DEPLOY_WAIT = 180.0
#: Tries when another process grabs the free port between our check and the server's bind.
PORT_RETRIES = 3
PREDICT_TIMEOUT = 60.0


class LocalModels(ModelBackend):
    """Mixin of ``LocalBackend``: reads ``self.home``, defines no ``__init__``."""

    home: LocalHome

    # ------------------------------------------------------------------ registry

    def _client(self):
        client = self.__dict__.get("_mlflow_client")
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.home.tracking_uri, registry_uri=self.home.tracking_uri)
            self.__dict__["_mlflow_client"] = client
        return client

    def register_model(self, request: RegisterRequest) -> ModelVersionInfo:
        request.validate()
        client = self._client()
        run = self._get_run(request.run_id)
        source, model_id = self._model_source(run, request.artifact_path)

        from mlflow.exceptions import MlflowException

        created_model = False
        version = None
        try:
            if not self._registered_model_exists(request.name):
                client.create_registered_model(request.name)
                created_model = True
            mv = client.create_model_version(
                name=request.name, source=source, run_id=run.info.run_id, tags=request.tags or None,
                model_id=model_id,
            )
            version = mv.version
            if request.alias:
                client.set_registered_model_alias(request.name, request.alias, mv.version)
        except (MlflowException, OSError) as e:
            # Undo what was created so a failed registration leaves nothing behind.
            with contextlib.suppress(Exception):
                if version is not None:
                    client.delete_model_version(request.name, version)
                if created_model:
                    client.delete_registered_model(request.name)
            raise BackendError(
                f"MLflow refused to register run {request.run_id} as {request.name!r}: {_mlflow_message(e)}",
                next_step=f"check that the tracking store {self.home.tracking_uri} is writable, then run "
                          f"%register_model again.",
            ) from None
        return ModelVersionInfo(
            name=request.name, version=int(mv.version), run_id=run.info.run_id, source=source,
            aliases=[request.alias] if request.alias else [], tags=dict(request.tags),
        )

    def _get_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self._client().get_run(run_id)
        except MlflowException as e:
            if _not_found(e):
                raise NotFound(
                    f"Run {run_id!r} does not exist in the tracking store {self.home.tracking_uri}. Use the run id "
                    f"that %%train printed (or leave --run out to register the last run of this kernel)."
                ) from None
            raise _store_error(e, self.home.tracking_uri) from None

    def _model_source(self, run, artifact_path: str) -> tuple[str, str | None]:
        """Where the model of ``run`` at ``artifact_path`` lives: an MLflow 3 logged model, or run artifacts."""
        client = self._client()
        run_id = run.info.run_id
        logged = []
        token = None
        while True:
            page = client.search_logged_models(
                experiment_ids=[run.info.experiment_id], filter_string=f"name = '{artifact_path}'", page_token=token
            )
            logged.extend(m for m in page if m.source_run_id == run_id)
            token = page.token
            if not token:
                break
        if logged:
            newest = max(logged, key=lambda m: m.creation_timestamp or 0)
            # The artifact location, not "models:/<id>": MLflow's registry stores resolve
            # that URI through the *global* tracking URI, not this client's (an MLflow TODO).
            return newest.artifact_location, newest.model_id
        # MLflow 2 style: the model files sit in the run's artifacts.
        with contextlib.suppress(Exception):
            if any(a.path.endswith("MLmodel") for a in client.list_artifacts(run_id, artifact_path)):
                return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}", None
        others = sorted({m.name for m in self._run_logged_models(run)})
        found = (f"it has models named {', '.join(repr(n) for n in others)}: pass --artifact-path "
                 f"{others[0]}" if others else
                 "it has no logged model at all: log one from rank 0, e.g. "
                 "mlflow.pytorch.log_model(model, name='model')")
        raise NotFound(f"Run {run_id} has no model at artifact path {artifact_path!r}; {found}.")

    def _run_logged_models(self, run) -> list:
        with contextlib.suppress(Exception):
            page = self._client().search_logged_models(experiment_ids=[run.info.experiment_id], max_results=200)
            return [m for m in page if m.source_run_id == run.info.run_id]
        return []

    def _registered_model_exists(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self._client().get_registered_model(name)
            return True
        except MlflowException as e:
            if _not_found(e):
                return False
            raise

    def models(self) -> list[RegisteredModelInfo]:
        from mlflow.exceptions import MlflowException

        client = self._client()
        try:
            registered = _all_pages(client.search_registered_models)
            versions = _all_pages(client.search_model_versions)
        except MlflowException as e:
            raise _store_error(e, self.home.tracking_uri) from None
        by_name: dict[str, list[ModelVersionInfo]] = {}
        for mv in versions:
            by_name.setdefault(mv.name, []).append(ModelVersionInfo(
                name=mv.name, version=int(mv.version), run_id=mv.run_id, source=mv.source,
                aliases=[], tags=dict(mv.tags or {}),
            ))
        result = []
        for rm in sorted(registered, key=lambda r: r.name):
            aliases = {a: int(v) for a, v in (rm.aliases or {}).items()}
            for v in by_name.get(rm.name, []):  # the search API leaves version aliases out
                v.aliases = sorted(a for a, n in aliases.items() if n == v.version)
            result.append(RegisteredModelInfo(
                name=rm.name, versions=sorted(by_name.get(rm.name, []), key=lambda v: v.version), aliases=aliases,
            ))
        return result

    def resolve(self, ref: ModelRef) -> ModelVersionInfo:
        """The registered version ``ref`` points to now; ``NotFound`` naming what is missing."""
        from mlflow.exceptions import MlflowException

        client = self._client()
        try:
            try:
                rm = client.get_registered_model(ref.name)
            except MlflowException as e:
                if _not_found(e):
                    known = [m.name for m in _all_pages(client.search_registered_models)][:10]
                    hint = f" Registered models: {', '.join(known)}." if known else " No model is registered yet."
                    raise NotFound(
                        f"No registered model named {ref.name!r}.{hint} Register one with "
                        f"%register_model --name {ref.name}."
                    ) from None
                raise
            versions = sorted(int(v.version) for v in _all_pages(
                client.search_model_versions, filter_string=f"name = '{ref.name}'"))
            if ref.alias:
                aliases = dict(rm.aliases or {})
                if ref.alias not in aliases:
                    have = ", ".join(f"@{a}" for a in sorted(aliases)) or "none"
                    raise NotFound(
                        f"Model {ref.name!r} has no alias {ref.alias!r} (its aliases: {have}). Set it with "
                        f"%register_model --name {ref.name} --alias {ref.alias}, or deploy {ref.name}/VERSION."
                    )
                mv = client.get_model_version(ref.name, str(aliases[ref.alias]))
            elif ref.version:
                if ref.version not in versions:
                    raise NotFound(
                        f"Model {ref.name!r} has no version {ref.version} (versions: "
                        f"{', '.join(map(str, versions)) or 'none'}). %models lists them."
                    )
                mv = client.get_model_version(ref.name, str(ref.version))
            else:
                if not versions:
                    raise NotFound(f"Model {ref.name!r} has no versions yet; register one with %register_model.")
                mv = client.get_model_version(ref.name, str(versions[-1]))
        except MlflowException as e:
            raise _store_error(e, self.home.tracking_uri) from None
        return ModelVersionInfo(name=mv.name, version=int(mv.version), run_id=mv.run_id, source=mv.source,
                                aliases=sorted(getattr(mv, "aliases", []) or []), tags=dict(mv.tags or {}))

    # ------------------------------------------------------------------ serving

    def deploy(self, spec: DeploySpec, wait: float | None = None) -> DeploymentInfo:
        spec.validate()
        if spec.min_replicas != 1 or spec.max_replicas != 1 or spec.canary_percent is not None or spec.profile:
            raise InvalidRequest(
                "The local backend serves exactly one replica on this machine: --min-replicas/--max-replicas, "
                "--canary and --profile need the hub backend (--backend hub)."
            )
        version = self.resolve(spec.model)
        timeout = DEFAULT_DEPLOY_WAIT if wait is None else float(wait)
        if timeout <= 0:
            raise InvalidRequest(f"--timeout must be a positive number of seconds; got {wait!r}.")
        with self._lock():
            old = self._read_record(spec.name)
            old_server = _server_of(old) if old else None
            taken = {r.get("port") for r in self._records() if r.get("name") != spec.name
                     and model_server.alive(_server_of(r))}
            if spec.port is not None:
                self._check_port(spec, old, old_server, taken)
            model_uri = f"models:/{version.name}/{version.version}"
            server = self._start_ready(spec, model_uri, taken, timeout)
            now = time.time()
            record = {
                **DeploymentInfo(
                    name=spec.name, model=str(spec.model), version=version.version,
                    url=f"{server.base_url}/invocations", state="ready", backend="local", created=now,
                    pid=server.pid,
                ).to_dict(),
                "port": server.port, "create_time": server.create_time, "log_path": server.log_path,
                "model_uri": model_uri, "tracking_uri": self.home.tracking_uri,
            }
            if old_server is not None:
                record["message"] = f"replaced {old['model']} version {old['version']} ({old['url']})"
            try:
                self._write_record(spec.name, record)
            except BaseException:
                model_server.stop(server)  # unrecorded, it would be an orphan: the old one keeps serving
                _unlink(server.log_path)
                raise
            if old_server is not None:
                model_server.stop(old_server)
                _unlink(old_server.log_path)
        return DeploymentInfo.from_dict(record)

    def _check_port(self, spec: DeploySpec, old: dict | None, old_server: ServerProcess | None,
                    taken: set[int]) -> None:
        port = spec.port
        if old_server is not None and old_server.port == port and model_server.alive(old_server):
            raise Conflict(
                f"Deployment {spec.name!r} already serves on port {port}; replacing it without downtime needs a "
                f"second port while both run. Leave --port out (the name stays the same, %predict {spec.name} "
                f"follows it), or %undeploy {spec.name} first to reuse port {port}."
            )
        if port in taken:
            holder = next(r.get("name") for r in self._records() if r.get("port") == port)
            raise Conflict(f"Port {port} is used by deployment {holder!r}; pick another --port or leave it out.")
        if not model_server.port_free(port):
            raise Conflict(
                f"Port {port} on 127.0.0.1 is already in use by another program; pick another --port or leave "
                f"it out to get a free one."
            )

    def _start_ready(self, spec: DeploySpec, model_uri: str, taken: set[int],
                     timeout: float) -> ServerProcess:
        """Start a server and wait until it answers; on any failure stop it and leave nothing."""
        env = model_server.server_env(self.home.tracking_uri, self.home.root)
        deadline = time.monotonic() + timeout
        for attempt in range(PORT_RETRIES):
            port = spec.port if spec.port is not None else model_server.free_port(avoid=taken)
            log = self.home.deployments_dir / f"{spec.name}.{port}.{os.getpid()}.{int(time.time() * 1000)}.log"
            server = None
            try:
                server = model_server.start(model_uri, port, log, env)
                outcome = model_server.wait_ready(server, max(0.1, deadline - time.monotonic()))
            except BaseException:  # KeyboardInterrupt: the cell was interrupted while starting or waiting
                if server is not None:
                    model_server.stop(server)
                _unlink(log)
                raise
            if outcome == "ready":
                return server
            tail = model_server.log_tail(log)
            in_use = outcome == "exited" and model_server.address_in_use(log)
            raced = in_use and spec.port is None
            model_server.stop(server)
            _unlink(log)
            if raced and attempt + 1 < PORT_RETRIES:
                taken = taken | {port}
                continue
            if outcome == "timeout":
                raise BackendError(
                    f"The model server for {model_uri} did not answer within {timeout:g} s and was stopped.",
                    next_step="retry with a longer --timeout, or look at the server log above for what it waits on.",
                    detail=tail,
                )
            if in_use:
                raise Conflict(f"Port {port} was taken by another program while the server started; "
                               f"pick another --port or leave it out.")
            raise BackendError(
                f"The model server for {model_uri} exited before answering (log tail below); nothing was deployed.",
                next_step="fix what the log reports (often a package the model needs is missing from this "
                          "environment: pip install it), then %deploy again.",
                detail=tail,
            )
        raise BackendError("Could not find a free port after several tries.", next_step="try %deploy again.")

    def deployments(self) -> list[DeploymentInfo]:
        result = []
        for record in self._records():
            info = DeploymentInfo.from_dict(record)
            server = _server_of(record)
            if not model_server.alive(server):
                info.state = "dead"
                info.message = (f"server process {server.pid} has exited; %undeploy {info.name} to clear it or "
                                f"%deploy {info.model} --name {info.name} to start it again")
            elif not model_server.ping(server.base_url, timeout=1.0):
                info.state = "unresponsive"
                info.message = f"process {server.pid} runs but does not answer {server.base_url}/ping"
            result.append(info)
        return result

    def undeploy(self, name: str) -> None:
        names.dns_label(name, "Deployment name")
        with self._lock():
            record = self._read_record(name)
            if record is None:
                raise NotFound(self._unknown_deployment(name))
            server = _server_of(record)
            model_server.stop(server)
            _unlink(self._record_path(name))
            _unlink(server.log_path)

    def predict(self, name: str, data: Any) -> Any:
        names.dns_label(name, "Deployment name")
        body = scoring_payload(data)
        record = self._read_record(name)
        if record is None:
            raise NotFound(self._unknown_deployment(name))
        for attempt in range(3):
            server = _server_of(record)
            if not model_server.alive(server):
                fresh = self._read_record(name)
                if fresh and fresh.get("pid") != record.get("pid"):  # replaced meanwhile: follow it
                    record = fresh
                    continue
                raise BackendError(
                    f"Deployment {name!r} is dead: its server process {server.pid} has exited.",
                    next_step=f"%deploy {record['model']} --name {name} to start it again, or %undeploy {name} "
                              f"to remove it.",
                    detail=model_server.log_tail(server.log_path, 8),
                )
            try:
                status, answer = model_server.post_json(record["url"], body, timeout=PREDICT_TIMEOUT)
            except (OSError, urllib.error.URLError) as e:
                fresh = self._read_record(name)
                if fresh and fresh.get("pid") != record.get("pid"):
                    record = fresh
                    continue
                raise BackendError(
                    f"Deployment {name!r} did not answer at {record['url']}: {getattr(e, 'reason', e)}.",
                    next_step=f"%deployments shows its state; %deploy {record['model']} --name {name} restarts it.",
                ) from None
            if status == 200:
                return predictions_from_response(answer)
            message = answer.get("message", answer) if isinstance(answer, dict) else answer
            if 400 <= status < 500:
                raise InvalidRequest(
                    f"Deployment {name!r} refused the data (HTTP {status}): {str(message).strip()[:600]} "
                    f"Send rows shaped like the model's training data, e.g. [[5.1, 3.5, 1.4, 0.2]]."
                )
            raise BackendError(
                f"Deployment {name!r} failed to predict (HTTP {status}).",
                next_step="look at the error below; the model may need a package missing in this environment.",
                detail=str(message)[:2000],
            )
        raise BackendError(f"Deployment {name!r} kept moving while predicting.", next_step="try again.")

    # ------------------------------------------------------------------ records

    def _unknown_deployment(self, name: str) -> str:
        known = [str(r.get("name")) for r in self._records()]
        listed = f"Deployments: {', '.join(known)}." if known else "There are no deployments."
        return f"No deployment named {name!r}. {listed} Create one with %deploy MODEL --name {name}."

    def _record_path(self, name: str) -> Path:
        return self.home.deployments_dir / f"{name}.json"

    def _read_record(self, name: str) -> dict | None:
        try:
            return json.loads(self._record_path(name).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def _records(self) -> list[dict]:
        d = self.home.deployments_dir
        if not d.is_dir():
            return []
        out = []
        for path in sorted(d.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(path.read_text()))
        return out

    def _write_record(self, name: str, record: dict) -> None:
        path = self._record_path(name)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)  # atomic: a reader sees the old or the new record, never half of one

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise deploy/undeploy across kernels sharing one HUBML_HOME."""
        self.home.deployments_dir.mkdir(parents=True, exist_ok=True)
        with open(self.home.deployments_dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _server_of(record: dict) -> ServerProcess:
    return ServerProcess(pid=int(record.get("pid") or 0), create_time=float(record.get("create_time") or 0),
                         port=int(record.get("port") or 0), log_path=str(record.get("log_path") or ""))


def _unlink(path: str | Path) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _all_pages(search, **kwargs) -> list:
    items, token = [], None
    while True:
        page = search(page_token=token, **kwargs) if token else search(**kwargs)
        items.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return items


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _mlflow_message(e: Exception) -> str:
    return str(getattr(e, "message", e)).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__


def _store_error(e: Exception, uri: str) -> BackendError:
    return BackendError(
        f"The MLflow tracking store {uri} failed: {_mlflow_message(e)}",
        next_step="check MLFLOW_TRACKING_URI (or HUBML_HOME) points to a reachable, writable store, then retry.",
    )
