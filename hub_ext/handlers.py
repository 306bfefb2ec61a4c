"""Tornado handlers of the REST API (``<service prefix>api/v1/...``).

Every handler: authenticates the JupyterHub token with ``HubAuth`` (the
notebook sends ``Authorization: token $JUPYTERHUB_API_TOKEN``), requires the
route's custom scope, validates input against the OpenAPI schemas, acts only
for the calling user, and answers errors as ``{"error": "..."}`` with
400/401/403/404/409 (bad input never yields 500). Kubernetes or MLflow
trouble is 502/503 with what failed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from typing import Any

from jupyterhub.services.auth import check_scopes
from tornado import web

from hubml.errors import BackendError, Conflict, Forbidden, HubMLError, InvalidRequest, NotFound
from hubml.models import RegisterRequest
from hubml.registry import metrics_to_json

from . import kube as k
from . import openapi
from .policy import Caller

log = logging.getLogger("hubml.hub_ext")

_RUN_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")

SCOPE_JOBS = "custom:hubml:jobs"
SCOPE_MODELS = "custom:hubml:models"
SCOPE_DEPLOYMENTS = "custom:hubml:deployments"
ALL_SCOPES = (SCOPE_JOBS, SCOPE_MODELS, SCOPE_DEPLOYMENTS)


class ApiError(web.HTTPError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, reason=None)
        self.message = message


def _translate(e: BaseException) -> ApiError:
    """hubml and Kubernetes exceptions -> HTTP status + one paragraph."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidRequest):
        return ApiError(400, str(e))
    if isinstance(e, Forbidden):
        return ApiError(403, str(e))
    if isinstance(e, NotFound):
        return ApiError(404, str(e))
    if isinstance(e, Conflict):
        return ApiError(409, str(e))
    if isinstance(e, k.Conflict):
        return ApiError(409, f"An object of that name exists already in the cluster: {e}")
    if isinstance(e, k.Invalid):
        return ApiError(400, f"Kubernetes refused the request: {e}")
    if isinstance(e, k.NotFound):
        return ApiError(404, f"Not found in the cluster: {e}")
    if isinstance(e, k.Forbidden):
        return ApiError(502, f"The hub service's Kubernetes service account is not allowed to do this ({e}); "
                             f"an administrator must grant it the Role in the README's 'Hub service RBAC' section (or install helm-values/hubml-extras).")
    if isinstance(e, k.KubeError):
        return ApiError(503, f"Kubernetes is unavailable: {e}")
    if isinstance(e, BackendError):
        return ApiError(502, str(e))
    if isinstance(e, HubMLError):
        return ApiError(400, str(e))
    if isinstance(e, (TypeError, ValueError)):  # a field of the wrong shape that slipped past the schema
        return ApiError(400, f"Invalid request: {e}")
    log.exception("unexpected error", exc_info=e)
    return ApiError(500, f"Internal error ({type(e).__name__}); the hub service log has the details.")


def api_method(func):
    """Run a handler method, answering every failure as a JSON error."""

    @functools.wraps(func)
    async def wrapper(self: "BaseHandler", *args: Any, **kwargs: Any) -> None:
        try:
            await func(self, *args, **kwargs)
        except web.Finish:
            raise
        except Exception as e:  # noqa: BLE001 - translated, never leaked as a stack trace
            err = _translate(e)
            self.send_json({"error": err.message}, err.status_code)

    return wrapper


class BaseHandler(web.RequestHandler):
    """Authentication, JSON in/out, errors."""

    #: scopes any of which grants access to this route (None: no authentication)
    required_scopes: tuple[str, ...] | None = ALL_SCOPES

    @property
    def service(self):
        return self.settings["hubml_service"]

    def check_xsrf_cookie(self) -> None:
        """Token-authenticated JSON API: no cookies, so no XSRF."""

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "message", None) or self._reason
        if not self._finished:
            self.finish(json.dumps({"error": message}))

    async def prepare(self) -> None:
        self.caller: Caller | None = None
        if self.required_scopes is None:
            return
        try:
            self.caller = await self.service.authenticate(self, self.required_scopes)
        except ApiError as e:
            self.send_json({"error": e.message}, e.status_code)
            raise web.Finish() from None

    def body(self, schema: str) -> dict[str, Any]:
        if len(self.request.body) > 1024 * 1024:
            raise InvalidRequest("The request body is larger than 1 MiB.")
        try:
            data = json.loads(self.request.body or b"null")
        except ValueError as e:
            raise InvalidRequest(f"The request body is not JSON ({e}); send a JSON object.") from None
        if not isinstance(data, dict):
            raise InvalidRequest(f"The request body must be a JSON object ({schema}).")
        return openapi.validate(schema, data)

    def reject_unknown_query(self, allowed: set[str]) -> None:
        unknown = sorted(set(self.request.query_arguments) - allowed)
        if unknown:
            raise InvalidRequest(f"Unknown query parameter(s): {', '.join(unknown)}.")


class NotFoundHandler(BaseHandler):
    required_scopes = None

    async def prepare(self) -> None:
        self.send_json({"error": f"No API route {self.request.path}; see api/{openapi.API_VERSION}/openapi.json."},
                       404)
        raise web.Finish()


class OpenAPIHandler(BaseHandler):
    required_scopes = None

    @api_method
    async def get(self) -> None:
        self.send_json(openapi.document(self.service.api_url_path))


class InfoHandler(BaseHandler):
    @api_method
    async def get(self) -> None:
        training, serving = await self.service.flavours()
        self.send_json({"version": openapi.API_VERSION, "user": self.caller.name, "training": training,
                        "serving": serving, "namespace": self.service.namespace})


class ProfilesHandler(BaseHandler):
    @api_method
    async def get(self) -> None:
        self.send_json(await self.service.profiles_for(self.caller))


class JobsHandler(BaseHandler):
    required_scopes = (SCOPE_JOBS,)

    @api_method
    async def get(self) -> None:
        jobs = await self.service.training.list(self.caller)
        self.send_json([j.to_dict() for j in jobs])

    @api_method
    async def post(self) -> None:
        body = self.body("TrainRequest")
        status = await self.service.training.submit(self.caller, body)
        self.send_json(status.to_dict(), 201)


class JobHandler(BaseHandler):
    required_scopes = (SCOPE_JOBS,)

    @api_method
    async def get(self, job_id: str) -> None:
        self.send_json((await self.service.training.get(self.caller, job_id)).to_dict())


class JobCancelHandler(BaseHandler):
    required_scopes = (SCOPE_JOBS,)

    @api_method
    async def post(self, job_id: str) -> None:
        self.send_json((await self.service.training.cancel(self.caller, job_id)).to_dict())


class JobLogsHandler(BaseHandler):
    required_scopes = (SCOPE_JOBS,)

    @api_method
    async def get(self, job_id: str) -> None:
        self.reject_unknown_query({"cursor", "wait"})
        cursor = self.get_query_argument("cursor", "")
        raw_wait = self.get_query_argument("wait", "0")
        try:
            wait = float(raw_wait)
        except ValueError:
            raise InvalidRequest(f"wait {raw_wait!r} must be a number of seconds from 0 to 30.") from None
        if not 0 <= wait <= 30:
            raise InvalidRequest(f"wait {raw_wait!r} must be a number of seconds from 0 to 30.")
        lines, next_cursor, state = await self.service.training.logs(self.caller, job_id, cursor, wait)
        self.send_json({"lines": [{"rank": ln.rank, "text": ln.text} for ln in lines],
                        "next_cursor": next_cursor, "state": state.value})


class RunMetricsHandler(BaseHandler):
    required_scopes = (SCOPE_JOBS,)

    @api_method
    async def get(self, run_id: str) -> None:
        if not _RUN_ID.match(run_id):
            raise NotFound(f"Run {run_id!r} does not exist.")
        metrics = await asyncio.to_thread(self.service.registry.run_metrics, run_id, self.caller.name)
        self.send_json(metrics_to_json(metrics))


class ModelsHandler(BaseHandler):
    required_scopes = (SCOPE_MODELS,)

    @api_method
    async def get(self) -> None:
        models = await asyncio.to_thread(self.service.registry.models, self.caller.name)
        self.send_json([m.to_dict() for m in models])

    @api_method
    async def post(self) -> None:
        body = self.body("RegisterRequest")
        request = RegisterRequest(**body).validate()
        version = await asyncio.to_thread(self.service.registry.register, request, self.caller.name)
        self.send_json(version.to_dict(), 201)


class ModelVersionHandler(BaseHandler):
    required_scopes = (SCOPE_MODELS,)

    @api_method
    async def get(self, name: str, version: str) -> None:
        self.send_json(await asyncio.to_thread(self.service.registry.described, name, version, self.caller.name))


class DeploymentsHandler(BaseHandler):
    required_scopes = (SCOPE_DEPLOYMENTS,)

    @api_method
    async def get(self) -> None:
        self.send_json([d.to_dict() for d in await self.service.serving.list(self.caller)])

    @api_method
    async def post(self) -> None:
        body = self.body("DeployRequest")
        info = await self.service.serving.deploy(self.caller, body)
        self.send_json(info.to_dict(), 201)


class DeploymentHandler(BaseHandler):
    required_scopes = (SCOPE_DEPLOYMENTS,)

    @api_method
    async def get(self, name: str) -> None:
        self.send_json((await self.service.serving.get(self.caller, name)).to_dict())

    @api_method
    async def delete(self, name: str) -> None:
        await self.service.serving.delete(self.caller, name)
        self.set_status(204)
        self.finish()


class DeploymentRolloutHandler(BaseHandler):
    """``POST /deployments/NAME/promote`` and ``/rollback``: finish a KServe canary one way or the other."""

    required_scopes = (SCOPE_DEPLOYMENTS,)

    @api_method
    async def post(self, name: str, step: str) -> None:
        if self.request.body and self.request.body.strip() not in (b"", b"{}"):
            raise InvalidRequest(f"POST /deployments/{name}/{step} takes no body; send none (or {{}}).")
        serving = self.service.serving
        info = await (serving.promote(self.caller, name) if step == "promote" else serving.rollback(self.caller, name))
        self.send_json(info.to_dict())


def routes(prefix: str) -> list[tuple[str, type[web.RequestHandler]]]:
    """URL patterns under ``<prefix>api/v1/``."""
    base = f"{prefix.rstrip('/')}/api/{openapi.API_VERSION}"
    seg = r"([^/]+)"
    return [
        (f"{base}/?", InfoHandler),
        (f"{base}/openapi.json", OpenAPIHandler),
        (f"{base}/profiles", ProfilesHandler),
        (f"{base}/jobs", JobsHandler),
        (f"{base}/jobs/{seg}", JobHandler),
        (f"{base}/jobs/{seg}/cancel", JobCancelHandler),
        (f"{base}/jobs/{seg}/logs", JobLogsHandler),
        (f"{base}/runs/{seg}/metrics", RunMetricsHandler),
        (f"{base}/models", ModelsHandler),
        (f"{base}/models/{seg}/versions/{seg}", ModelVersionHandler),
        (f"{base}/deployments", DeploymentsHandler),
        (f"{base}/deployments/{seg}", DeploymentHandler),
        (f"{base}/deployments/{seg}/(promote|rollback)", DeploymentRolloutHandler),
    ]


def scope_error(caller_name: str, needed: tuple[str, ...]) -> ApiError:
    return ApiError(403, f"The token of {caller_name!r} lacks the scope {' or '.join(needed)}. A notebook server "
                         f"gets it from the hub's configuration (see 'The hub service: JupyterHub configuration' in hubml's README); for a token made by "
                         f"hand, request it: POST /hub/api/users/<name>/tokens with \"scopes\": {list(needed)}.")


def has_scope(scopes: list[str], needed: tuple[str, ...]) -> bool:
    return bool(check_scopes(set(needed), set(scopes)))

