"""The one Kubernetes client of the hub service (kubernetes_asyncio), kopf-style.

Why one module: every API call of the service goes through ``Kube.request``,
so there is exactly one place that (a) turns HTTP failures into hubml's own
status-keyed exceptions (``raise … from e``), (b) retries what is worth
retrying (connection errors, 429, 5xx, with exponential backoff) and nothing
else, and (c) knows the URL layout of built-in and custom resources. The
handlers and the job/serving logic only see dicts and these exceptions.

Objects travel as plain dicts (the manifests of ``training_objects.py`` and ``serving_objects.py``, and what the
API server returns), not as generated model classes: they are what tests
compare, what the OpenAPI document describes, and CRDs have no models anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("hubml.hub_ext.kube")


class KubeError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 = no answer)."""

    status = 0

    def __init__(self, message: str, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.reason = reason


class NotFound(KubeError):
    status = 404


class Conflict(KubeError):
    """409: the object exists already, or a stale resourceVersion."""

    status = 409


class Forbidden(KubeError):
    """403: the service account's RBAC does not allow this (an admin must fix the Role)."""

    status = 403


class Invalid(KubeError):
    """422/400: the API server (or a CRD schema / admission webhook) refused the object."""

    status = 422


class Unavailable(KubeError):
    """No answer, 429 or 5xx after the retries: the control plane is unreachable or overloaded."""

    status = 503


_BY_STATUS = {404: NotFound, 409: Conflict, 403: Forbidden, 401: Forbidden, 422: Invalid, 400: Invalid}


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API: ``/api/v1`` or ``/apis/<group>/<version>``, plural name."""

    group: str
    version: str
    plural: str
    kind: str

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if namespace is not None:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        if sub:
            base += f"/{sub}"
        return base

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


JOB = Resource("batch", "v1", "jobs", "Job")
POD = Resource("", "v1", "pods", "Pod")
SERVICE = Resource("", "v1", "services", "Service")
CONFIG_MAP = Resource("", "v1", "configmaps", "ConfigMap")
NODE = Resource("", "v1", "nodes", "Node")
NETWORK_POLICY = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
DEPLOYMENT = Resource("apps", "v1", "deployments", "Deployment")
HPA = Resource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler")
PYTORCH_JOB = Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
TRAIN_JOB = Resource("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
INFERENCE_SERVICE = Resource("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService")

BY_KIND = {r.kind: r for r in (JOB, POD, SERVICE, CONFIG_MAP, NODE, NETWORK_POLICY, DEPLOYMENT, HPA, PYTORCH_JOB,
                               TRAIN_JOB, INFERENCE_SERVICE)}


def resource_of(obj: dict[str, Any]) -> Resource:
    try:
        return BY_KIND[obj["kind"]]
    except KeyError:
        raise ValueError(f"hubml does not manage objects of kind {obj.get('kind')!r}") from None


def _message(e: ApiException) -> str:
    body = e.body
    if isinstance(body, bytes):
        body = body.decode("utf8", "replace")
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return str(body or e.reason)[:500]
    return str(data.get("message") or e.reason)[:2000] if isinstance(data, dict) else str(body)[:500]


async def _body_bytes(resp: Any) -> bytes:
    """The body of an unread aiohttp response as sent; a non-2xx answer raises ``ApiException`` like
    the client does, so ``Kube.request`` maps it the same way."""
    from kubernetes_asyncio.client.rest import RESTResponse

    try:
        raw = await resp.read()
    finally:
        resp.release()
    if not 200 <= resp.status <= 299:
        raise ApiException(http_resp=RESTResponse(resp, raw))
    return raw


class Kube:
    """An authenticated API client with retries; create with ``await Kube.connect(...)``."""

    def __init__(self, api: k8s_client.ApiClient, *, retries: int = 4, backoff: float = 0.1,
                 timeout: float = 15.0) -> None:
        self.api = api
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, context: str | None = None, **kw: Any) -> "Kube":
        """From a kubeconfig file when given, else the pod's service account (in-cluster)."""
        if kubeconfig:
            api = await k8s_config.new_client_from_config(config_file=kubeconfig, context=context)
        else:
            conf = k8s_client.Configuration()
            k8s_config.load_incluster_config(client_configuration=conf)
            api = k8s_client.ApiClient(configuration=conf)
        return cls(api, **kw)

    async def close(self) -> None:
        await self.api.close()

    # ------------------------------------------------------------------ the one request path

    async def request(self, method: str, path: str, *, body: Any = None, query: dict[str, Any] | None = None,
                      content_type: str = "application/json", raw: bool = False,
                      retry: bool = True) -> Any:
        """Call the API server; return the parsed JSON (or raw bytes), raise a ``KubeError`` subclass.

        Retried: connection errors, 429 and 5xx (writes too: every write of the
        service is a create with a fixed name or an idempotent patch/delete, so
        a retry after a lost answer ends in 409/404, which callers expect).

        ``raw=True`` returns the body exactly as sent, undecoded (a container
        log, read by a reader that counts bytes against ``limitBytes``): the
        client's own deserializer would first try it as JSON, so a log that
        happens to be one JSON value (``{"loss": 0.5}``, ``0.50``, ``null``)
        would come back as its Python ``str()`` or ``None``.
        """
        attempts = self.retries + 1 if retry else 1
        delay = self.backoff
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                result = await self.api.call_api(
                    path, method, query_params=list((query or {}).items()),
                    header_params={"Content-Type": content_type, "Accept": "application/json"},
                    body=body, auth_settings=["BearerToken"],
                    response_types_map={200: "object", 201: "object", 202: "object"},
                    _preload_content=not raw, _request_timeout=self.timeout,
                )
                if raw:
                    return await _body_bytes(result)
                data, _status, _headers = result
                return data
            except ApiException as e:
                status = int(e.status or 0)
                if status == 429 or status >= 500 or status == 0:
                    last = e
                else:
                    cls = _BY_STATUS.get(status, KubeError)
                    raise cls(f"{method} {path}: {_message(e)}", status=status, reason=str(e.reason)) from e
            except (asyncio.TimeoutError, OSError, ConnectionError) as e:
                last = e
            except Exception as e:  # aiohttp.ClientError and friends
                if type(e).__module__.startswith("aiohttp"):
                    last = e
                else:
                    raise
            if attempt + 1 < attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise Unavailable(f"{method} {path}: the Kubernetes API did not answer ({last})") from last

    # ------------------------------------------------------------------ verbs

    async def create(self, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        res = resource_of(obj)
        query = {"dryRun": "All"} if dry_run else None
        return await self.request("POST", res.path(obj["metadata"].get("namespace")), body=obj, query=query)

    async def get(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any]:
        return await self.request("GET", res.path(namespace, name))

    async def get_or_none(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self.get(res, namespace, name)
        except NotFound:
            return None

    async def list(self, res: Resource, namespace: str | None, *, labels: dict[str, str] | None = None,
                   field_selector: str | None = None) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        if labels:
            query["labelSelector"] = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        if field_selector:
            query["fieldSelector"] = field_selector
        data = await self.request("GET", res.path(namespace), query=query)
        items = data.get("items") or []
        for item in items:  # list items come without apiVersion/kind
            item.setdefault("apiVersion", res.api_version)
            item.setdefault("kind", res.kind)
        return items

    async def patch(self, res: Resource, namespace: str | None, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", res.path(namespace, name), body=patch,
                                  content_type="application/merge-patch+json")

    async def json_patch(self, res: Resource, namespace: str | None, name: str,
                         ops: list[dict[str, Any]]) -> dict[str, Any]:
        """RFC 6902 JSON patch: replaces whole fields and can ``test`` a value first (optimistic locking)."""
        return await self.request("PATCH", res.path(namespace, name), body=ops,
                                  content_type="application/json-patch+json")

    async def delete(self, res: Resource, namespace: str | None, name: str, *,
                     propagation: str = "Background") -> bool:
        """Delete; False when it was already gone (deletes are idempotent)."""
        try:
            await self.request("DELETE", res.path(namespace, name),
                               body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
        except NotFound:
            return False
        return True

    async def pod_log(self, namespace: str, name: str, *, container: str | None = None,
                      limit_bytes: int | None = None, since_time: str | None = None,
                      timestamps: bool = False, tail_lines: int | None = None) -> bytes:
        """A container's log (``kubectl logs``), as the kubelet sends it: bytes, since ``limitBytes`` counts them.

        ``since_time`` (RFC 3339; the API server passes it on to the kubelet at
        second precision) skips records stamped earlier; ``timestamps`` prefixes
        each line with its RFC 3339 (nanosecond) time and a space; the kubelet
        stops after ``limit_bytes`` bytes, possibly mid-line; ``tail_lines`` sends only
        the log's last lines. Not retried: a
        reader polls again anyway.
        """
        query: dict[str, Any] = {}
        if container:
            query["container"] = container
        if limit_bytes:
            query["limitBytes"] = int(limit_bytes)
        if since_time:
            query["sinceTime"] = since_time
        if timestamps:
            query["timestamps"] = "true"
        if tail_lines is not None:
            query["tailLines"] = int(tail_lines)
        return await self.request("GET", POD.path(namespace, name, "log"), query=query, raw=True, retry=False)

    async def has_resource(self, res: Resource) -> bool:
        """Whether the API server serves ``res`` (its CRD is installed and established)."""
        if not res.group:
            return True
        try:
            data = await self.request("GET", f"/apis/{res.group}/{res.version}")
        except NotFound:
            return False
        return any(r.get("name") == res.plural for r in data.get("resources") or ())


    async def openapi_schema(self, res: Resource, known_url: str = "") -> tuple[str, dict[str, Any] | None]:
        """The API server's published OpenAPI v3 schema of ``res``'s kind, with the document's URL.

        Why OpenAPI discovery rather than reading the CRD: ``/openapi/v3`` is
        open to every authenticated client (``system:discovery``), so the
        service needs no cluster-wide right on CustomResourceDefinitions; and
        it is what the API server actually validates against. The root lists
        each group-version's document with a content hash in its URL, so a
        caller that passes back ``known_url`` (the URL it got last time) gets
        ``(url, None)`` for "unchanged" at the cost of one small request.
        An unserved group-version answers ``("", {})``.
        """
        root = await self.request("GET", "/openapi/v3")
        entry = ((root or {}).get("paths") or {}).get(f"apis/{res.group}/{res.version}") or {}
        url = str(entry.get("serverRelativeURL") or "")
        if not url:
            return "", {}
        if known_url and known_url == url:
            return url, None
        path, _, query = url.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        doc = await self.request("GET", path, query=params)
        group_reversed = ".".join(reversed(res.group.split(".")))
        schema = (((doc or {}).get("components") or {}).get("schemas") or {}).get(
            f"{group_reversed}.{res.version}.{res.kind}") or {}
        return url, schema


async def detect_crds(kube: Kube) -> dict[str, bool]:
    """Which optional operators the cluster has: ``{"PyTorchJob": bool, "TrainJob": bool, "InferenceService": bool}``."""
    kinds = (PYTORCH_JOB, TRAIN_JOB, INFERENCE_SERVICE)
    found = await asyncio.gather(*(kube.has_resource(r) for r in kinds))
    return {r.kind: bool(f) for r, f in zip(kinds, found)}
