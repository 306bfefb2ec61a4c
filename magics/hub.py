"""The hub backend: the magics' ``Backend`` over hubml's hub service REST API.

Inside a JupyterHub single-user server the notebook holds no Kubernetes
credentials; it holds ``JUPYTERHUB_API_TOKEN``, which the hub service checks
(with the custom scopes ``custom:hubml:jobs``/``models``/``deployments``) and
then acts for this user only. Calls are plain synchronous HTTP (``urllib``):
magics run inside the kernel's own event loop and must never start another
one with ``asyncio.run``.

The service URL: ``HUBML_SERVICE_URL`` when set (the spawner sets it), else the
hub's public URL (from ``JUPYTERHUB_API_URL``) with ``/services/hubml/``.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from hubml.errors import BackendError, Conflict, Forbidden, HubMLError, InvalidRequest, NotFound
from hubml.jobs import JobStatus, LogChunk, LogLine, TrainSpec
from hubml.magics.backend import Backend
from hubml.models import DeploySpec, DeploymentInfo, ModelRef, ModelVersionInfo, RegisteredModelInfo, RegisterRequest

API = "api/v1"
SERVICE_NAME = "hubml"


def service_url() -> str:
    """Base URL of the hub service, ending in ``/``."""
    explicit = os.environ.get("HUBML_SERVICE_URL")
    if explicit:
        return explicit if explicit.endswith("/") else explicit + "/"
    api_url = os.environ.get("JUPYTERHUB_API_URL", "")
    parts = urllib.parse.urlsplit(api_url)
    path = parts.path
    base = path[: -len("hub/api")] if path.rstrip("/").endswith("hub/api") else "/"
    base = base if base.endswith("/") else base + "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"{base}services/{SERVICE_NAME}/", "", ""))


def service_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub service answers this notebook's token (used by ``%%train``'s auto-detection)."""
    token = os.environ.get("JUPYTERHUB_API_TOKEN")
    if not token or not os.environ.get("JUPYTERHUB_API_URL") and not os.environ.get("HUBML_SERVICE_URL"):
        return False
    req = urllib.request.Request(service_url() + API + "/", headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


class HubBackend(Backend):
    name = "hub"

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = url or service_url()
        if not self.url.endswith("/"):
            self.url += "/"
        self.token = token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
        self.timeout = timeout
        if not self.token:
            raise BackendError(
                "The hub backend needs a JupyterHub token and none is set (JUPYTERHUB_API_TOKEN).",
                next_step="run inside a JupyterHub server, or use --backend local.",
            )

    # ------------------------------------------------------------------ HTTP

    def _call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
              timeout: float | None = None) -> Any:
        url = self.url + API + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"token {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw).get("error") or e.reason
            except (ValueError, AttributeError):
                message = raw.decode("utf8", "replace")[:500] or str(e.reason)
            if e.code == 400:
                raise InvalidRequest(message) from None
            if e.code == 403:
                raise Forbidden(message) from None
            if e.code == 404:
                raise NotFound(message) from None
            if e.code == 409:
                raise Conflict(message) from None
            if e.code == 401:
                raise BackendError(f"The hub service refused this notebook's token: {message}",
                                   next_step="restart your server from the hub's home page to get a fresh "
                                             "token.") from None
            raise BackendError(f"The hub service failed ({e.code}): {message}",
                               next_step="retry in a minute; if it persists, tell your hub administrator.") from None
        except (urllib.error.URLError, OSError) as e:
            raise BackendError(f"Cannot reach the hub service at {self.url}: {getattr(e, 'reason', e)}",
                               next_step="check that the hub runs hubml's service, or use --backend local.") from None

    # ------------------------------------------------------------------ training

    def submit(self, spec: TrainSpec) -> JobStatus:
        spec.validate()
        return JobStatus.from_dict(self._call("POST", "/jobs", _drop_none(spec.to_dict())))

    def job(self, job_id: str) -> JobStatus:
        return JobStatus.from_dict(self._call("GET", f"/jobs/{urllib.parse.quote(job_id, safe='')}"))

    def jobs(self) -> list[JobStatus]:
        return [JobStatus.from_dict(d) for d in self._call("GET", "/jobs")]

    def read_logs(self, job_id: str, cursor: Any = None) -> LogChunk:
        data = self._call("GET", f"/jobs/{urllib.parse.quote(job_id, safe='')}/logs",
                          query={"cursor": cursor or None})
        return LogChunk(lines=[LogLine(int(x["rank"]), str(x["text"])) for x in data["lines"]],
                        next_cursor=data["next_cursor"])

    def cancel(self, job_id: str) -> JobStatus:
        return JobStatus.from_dict(self._call("POST", f"/jobs/{urllib.parse.quote(job_id, safe='')}/cancel"))

    def run_metrics(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        data = self._call("GET", f"/runs/{urllib.parse.quote(run_id, safe='')}/metrics")
        return {k: [(int(s), float(v)) for s, v in pts] for k, pts in data.items()}

    # ------------------------------------------------------------------ models

    def register_model(self, request: RegisterRequest) -> ModelVersionInfo:
        request.validate()
        body = _drop_none({"name": request.name, "run_id": request.run_id, "artifact_path": request.artifact_path,
                           "alias": request.alias, "tags": dict(request.tags) or None})
        data = self._call("POST", "/models", body)
        return ModelVersionInfo(**data)

    def models(self) -> list[RegisteredModelInfo]:
        out = []
        for m in self._call("GET", "/models"):
            out.append(RegisteredModelInfo(name=m["name"], aliases=dict(m.get("aliases") or {}),
                                           versions=[ModelVersionInfo(**v) for v in m.get("versions") or []]))
        return out

    def deploy(self, spec: DeploySpec, wait: float | None = None) -> DeploymentInfo:
        spec.validate()
        if spec.port is not None:
            raise InvalidRequest("--port only applies to the local backend; in a hub the cluster picks the "
                                 "endpoint. Leave --port out.")
        body = _drop_none({"model": str(spec.model), "name": spec.name, "profile": spec.profile,
                           "min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                           "canary_percent": spec.canary_percent})
        info = DeploymentInfo.from_dict(self._call("POST", "/deployments", body))
        deadline = time.monotonic() + (wait or 0)
        while wait and info.state == "starting" and time.monotonic() < deadline:
            time.sleep(1.0)
            info = self.deployment(spec.name)
        if info.state == "failed":
            raise BackendError(f"Deployment {spec.name!r} failed to start: {info.message}",
                               next_step=f"check the model with %models, then %undeploy {spec.name} and retry.")
        return info

    def deployment(self, name: str) -> DeploymentInfo:
        return DeploymentInfo.from_dict(self._call("GET", f"/deployments/{urllib.parse.quote(name, safe='')}"))

    def deployments(self) -> list[DeploymentInfo]:
        return [DeploymentInfo.from_dict(d) for d in self._call("GET", "/deployments")]

    def undeploy(self, name: str) -> None:
        self._call("DELETE", f"/deployments/{urllib.parse.quote(name, safe='')}")

    def promote(self, name: str) -> DeploymentInfo:
        return DeploymentInfo.from_dict(self._call("POST", f"/deployments/{urllib.parse.quote(name, safe='')}/promote"))

    def rollback(self, name: str) -> DeploymentInfo:
        return DeploymentInfo.from_dict(self._call("POST", f"/deployments/{urllib.parse.quote(name, safe='')}/rollback"))

    def _signature(self, info: DeploymentInfo) -> str | None:
        """The served version's input signature, as the service reads it from the MLmodel (None when unknown)."""
        try:
            name = urllib.parse.quote(ModelRef.parse(info.model).name, safe="")
            return self._call("GET", f"/models/{name}/versions/{info.version}").get("signature")
        except (HubMLError, AttributeError):
            return None

    def predict(self, name: str, data: Any) -> Any:
        """POST the data to the deployment's endpoint, as the hub service reports it.

        The URL is where notebook pods reach the model: KServe's own reported
        address, the administrator's ``HubMLService.deployment_url_template``, or
        in-cluster DNS. KServe speaks the Open Inference Protocol (the URL ends in
        ``/infer``), MLflow's scoring server its own JSON (``/invocations``).
        """
        from hubml import scoring

        body = scoring.request_body(data)  # bad data: InvalidRequest before any request is sent
        info = self.deployment(name)       # not the caller's: Forbidden / NotFound from the service
        protocol = scoring.protocol_of_url(info.url)
        if protocol != scoring.MLFLOW:
            body = scoring.request_body(data, protocol)
        req = urllib.request.Request(info.url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            answer = e.read()
            if 400 <= e.code < 500 and e.code not in (404, 408, 429):
                raise scoring.refused_data(name, e.code, answer, self._signature(info), _model_uri(info)) from None
            raise BackendError(
                f"Deployment {name!r} at {info.url} failed to predict (HTTP {e.code}).",
                next_step=_unreachable_step(info) if e.code in (404, 502, 503, 504) else
                "look at the error below; if the model itself fails, fix it, register a new version and "
                f"%deploy {info.model} --name {name} again.",
                detail=scoring.server_error_text(answer),
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BackendError(f"Deployment {name!r} did not answer at {info.url}: {reason}.",
                               next_step=_unreachable_step(info)) from None
        try:
            result = json.loads(raw)
        except ValueError:
            raise BackendError(f"Deployment {name!r} at {info.url} answered something that is not JSON.",
                               next_step=_unreachable_step(info),
                               detail=raw.decode("utf8", "replace")[:500]) from None
        return scoring.predictions(result, protocol)


def _model_uri(info: DeploymentInfo) -> str:
    """The ``models:/NAME/VERSION`` URI of the version a deployment serves."""
    return f"models:/{ModelRef.parse(info.model).name}/{info.version}"


def _unreachable_step(info: DeploymentInfo) -> str:
    if info.state != "ready":
        return (f"%deployments shows it is {info.state}; wait until it is ready and try again"
                + (f" ({info.message})" if info.message else "") + ".")
    return (f"%deployments shows its state; if it says ready and this persists, the notebook cannot reach "
            f"{info.url}: ask your hub administrator (HubMLService.deployment_url_template says how notebooks "
            f"reach deployments).")
