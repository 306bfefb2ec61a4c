"""The local backend's deployments: one ``mlflow models serve`` process per name.

Each deployment is one ``mlflow models serve --env-manager local`` process on
a loopback port (``model_server``), recorded in ``home.deployments_dir/<name>.json``
so that a later kernel finds it, predicts through it and stops it. A second
deploy of the same name starts the new server, waits until it answers,
switches the record and only then stops the old one, so ``%predict NAME``
never goes dark. The versions come from ``LocalRegistry``.
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

from hubml import names, scoring
from hubml.errors import BackendError, Conflict, InvalidRequest, NotFound
from hubml.magics.local import model_server
from hubml.magics.local.home import LocalHome
from hubml.magics.local.model_server import ServerProcess
from hubml.models import DeploySpec, DeploymentInfo, ModelRef
from hubml.registry import Registry

#: Seconds ``deploy`` waits for a new server to answer when the caller gives no limit.
DEFAULT_DEPLOY_WAIT = 180.0
#: Tries when another process grabs the free port between our check and the server's bind.
PORT_RETRIES = 3
PREDICT_TIMEOUT = 60.0


class LocalDeployments:
    """Mixin of ``LocalBackend``: reads ``self.home`` and ``self.registry``, defines no ``__init__``."""

    home: LocalHome
    registry: Registry

    def deploy(self, spec: DeploySpec, wait: float | None = None) -> DeploymentInfo:
        spec.validate()
        if spec.min_replicas != 1 or spec.max_replicas != 1 or spec.canary_percent is not None or spec.profile:
            raise InvalidRequest(
                "The local backend serves exactly one replica on this machine: --min-replicas/--max-replicas, "
                "--canary and --profile need the hub backend (--backend hub)."
            )
        version = self.registry.resolve(spec.model)
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

    def promote(self, name: str) -> DeploymentInfo:
        return self._no_canaries(name, "--promote")

    def rollback(self, name: str) -> DeploymentInfo:
        return self._no_canaries(name, "--rollback")

    def _no_canaries(self, name: str, flag: str) -> DeploymentInfo:
        names.dns_label(name, "Deployment name")
        if self._read_record(name) is None:
            raise NotFound(self._unknown_deployment(name))
        raise InvalidRequest(
            f"%deploy {flag} finishes a canary rollout, and local deployments have no canaries: each serves one "
            f"version, and %deploy MODEL --name {name} replaces it without downtime. Canaries need the hub "
            f"backend with KServe (--backend hub)."
        )

    def predict(self, name: str, data: Any) -> Any:
        names.dns_label(name, "Deployment name")
        body = scoring.request_body(data)
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
                return scoring.predictions(answer)
            if 400 <= status < 500:
                raise scoring.refused_data(name, status, answer, self._signature(record),
                                           str(record.get("model_uri") or record.get("model")))
            raise BackendError(
                f"Deployment {name!r} failed to predict (HTTP {status}).",
                next_step="look at the error below; the model may need a package missing in this environment.",
                detail=scoring.server_error_text(answer),
            )
        raise BackendError(f"Deployment {name!r} kept moving while predicting.", next_step="try again.")

    def _signature(self, record: dict) -> str | None:
        """The served version's input signature, from its MLmodel in the registry (None when unknown)."""
        try:
            name = ModelRef.parse(str(record.get("model") or "")).name
            version = int(record.get("version") or 0)
        except (InvalidRequest, ValueError):
            return None
        return self.registry.signature(name, version) if version else None

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



