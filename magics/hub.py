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

from hubml.errors import BackendError, Conflict, Forbidden, InvalidRequest, NotFound
from hubml.jobs import JobStatus, LogChunk, LogLine, TrainSpec
from hubml.magics.backend import Backend
from hubml.models import DeploySpec, DeploymentInfo, ModelVersionInfo, RegisteredModelInfo, RegisterRequest

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

    def predict(self, name: str, data: Any) -> Any:
        """POST to the deployment's in-cluster endpoint (reachable from notebook pods)."""
        from hubml.scoring import scoring_payload

        info = self.deployment(name)
        payload = scoring_payload(data)
        if info.url.endswith("/infer"):  # KServe's MLflow runtime speaks the V2 (Open Inference) protocol
            payload = _v2_request(payload)
        req = urllib.request.Request(info.url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                result = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise BackendError(f"Deployment {name!r} refused the data ({e.code}): "
                               f"{e.read().decode('utf8', 'replace')[:500]}",
                               next_step="check the columns and types the model expects.") from None
        except (urllib.error.URLError, OSError) as e:
            raise BackendError(f"Deployment {name!r} at {info.url} did not answer: {getattr(e, 'reason', e)}",
                               next_step="check %deployments; it may still be starting.") from None
        if isinstance(result, dict) and "predictions" in result:
            return result["predictions"]
        if isinstance(result, dict) and "outputs" in result:
            outputs = result["outputs"]
            return outputs[0].get("data") if len(outputs) == 1 else outputs
        return result


def _v2_request(payload: dict[str, Any]) -> dict[str, Any]:
    """MLflow scoring JSON -> an Open Inference Protocol request of one tensor."""
    rows = payload.get("inputs") or payload.get("instances")
    if rows is None and "dataframe_split" in payload:
        rows = payload["dataframe_split"].get("data")
    if rows is None and "dataframe_records" in payload:
        rows = [list(r.values()) for r in payload["dataframe_records"]]
    flat: list[Any] = []
    shape = [len(rows)] if isinstance(rows, list) else [1]
    if isinstance(rows, list) and rows and isinstance(rows[0], list):
        shape.append(len(rows[0]))
        for r in rows:
            flat.extend(r)
    else:
        flat = list(rows) if isinstance(rows, list) else [rows]
    dtype = "FP64" if any(isinstance(x, float) for x in flat) else "INT64" if all(
        isinstance(x, int) for x in flat) else "BYTES"
    return {"inputs": [{"name": "input-0", "shape": shape, "datatype": dtype, "data": flat}]}
