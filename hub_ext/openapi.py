"""The OpenAPI 3.0 document of the hub service's REST API, and request validation from it.

One source of truth: the handlers validate every request body and query
parameter against the schemas below (``validate``), the service serves the
same document at ``api/v1/openapi.json``, and the tests fuzz the running
service from it (schemathesis). A field added here is documented, checked and
fuzzed at once.

Optional fields are left out rather than sent as ``null`` (clients drop
``None``), which keeps the schemas plain JSON Schema.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema

from hubml.errors import InvalidRequest
from hubml.jobs import MAX_CODE_BYTES, MAX_GPUS_PER_WORKER, MAX_WORKERS

from .log_cursor import CURSOR_DOCUMENTED_LENGTH, CURSOR_MAX_LENGTH, CURSOR_PATTERN

API_VERSION = "v1"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string", "description": "What was wrong and how to fix it."}}},
    "TrainRequest": {
        "type": "object", "additionalProperties": False, "required": ["code"],
        "properties": {
            "code": {"type": "string", "minLength": 1, "maxLength": MAX_CODE_BYTES,
                     "description": "The cell: a standalone Python script run by every worker process; "
                                    "one that does not compile is refused (400) before anything is created."},
            "workers": {"type": "integer", "minimum": 1, "maximum": MAX_WORKERS, "default": 1},
            "gpus_per_worker": {"type": "integer", "minimum": 0, "maximum": MAX_GPUS_PER_WORKER, "default": 0},
            "profile": {"type": "string", "pattern": DNS_LABEL},
            "experiment": {"type": "string", "minLength": 1, "maxLength": 256},
            "run_name": {"type": "string", "minLength": 1, "maxLength": 250},
            "env": {"type": "object", "maxProperties": 100,
                    "additionalProperties": {"type": "string", "maxLength": 32768}},
            "timeout": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 30 * 86400},
            "image": {"type": "string", "minLength": 1, "maxLength": 512},
        },
    },
    "WorkerStatus": {"type": "object", "required": ["rank", "state"],
                     "properties": {"rank": {"type": "integer"}, "state": {"$ref": "#/components/schemas/JobState"},
                                    "exit_code": {"type": "integer", "nullable": True}}},
    "JobState": {"type": "string", "enum": ["pending", "running", "succeeded", "failed", "cancelled"]},
    "JobStatus": {
        "type": "object", "required": ["id", "state", "workers", "backend", "created"],
        "properties": {
            "id": {"type": "string"}, "state": {"$ref": "#/components/schemas/JobState"},
            "workers": {"type": "integer"}, "backend": {"type": "string"}, "created": {"type": "number"},
            "started": {"type": "number", "nullable": True}, "finished": {"type": "number", "nullable": True},
            "run_id": {"type": "string", "nullable": True}, "experiment_id": {"type": "string", "nullable": True},
            "experiment": {"type": "string", "nullable": True}, "run_name": {"type": "string", "nullable": True},
            "profile": {"type": "string", "nullable": True}, "gpus_per_worker": {"type": "integer"},
            "failed_rank": {"type": "integer", "nullable": True}, "exit_code": {"type": "integer", "nullable": True},
            "message": {"type": "string"},
            "worker_states": {"type": "array", "items": {"$ref": "#/components/schemas/WorkerStatus"}},
        },
    },
    "LogChunk": {
        "type": "object", "required": ["lines", "next_cursor", "state"],
        "properties": {
            "lines": {"type": "array", "items": {"type": "object", "required": ["rank", "text"],
                                                 "properties": {"rank": {"type": "integer"},
                                                                "text": {"type": "string"}}}},
            "next_cursor": {"type": "string", "pattern": CURSOR_PATTERN, "maxLength": CURSOR_MAX_LENGTH},
            "state": {"$ref": "#/components/schemas/JobState"},
        },
    },
    "RegisterRequest": {
        "type": "object", "additionalProperties": False, "required": ["name", "run_id"],
        "properties": {
            "name": {"type": "string", "pattern": MODEL_NAME},
            "run_id": {"type": "string", "pattern": r"^[A-Za-z0-9]{1,64}$"},
            "artifact_path": {"type": "string", "minLength": 1, "maxLength": 256},
            "alias": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$"},
            "tags": {"type": "object", "maxProperties": 50,
                     "additionalProperties": {"type": "string", "maxLength": 5000}},
        },
    },
    "ModelVersion": {"type": "object", "required": ["name", "version"],
                     "properties": {"name": {"type": "string"}, "version": {"type": "integer"},
                                    "run_id": {"type": "string", "nullable": True},
                                    "source": {"type": "string", "nullable": True},
                                    "aliases": {"type": "array", "items": {"type": "string"}},
                                    "tags": {"type": "object", "additionalProperties": {"type": "string"}}}},
    "ModelVersionDetail": {"allOf": [{"$ref": "#/components/schemas/ModelVersion"},
                                     {"type": "object", "required": ["signature"],
                                      "properties": {"signature": {"type": "string", "nullable": True}}}]},
    "RegisteredModel": {"type": "object", "required": ["name", "versions", "aliases"],
                        "properties": {"name": {"type": "string"},
                                       "versions": {"type": "array",
                                                    "items": {"$ref": "#/components/schemas/ModelVersion"}},
                                       "aliases": {"type": "object", "additionalProperties": {"type": "integer"}}}},
    "DeployRequest": {
        "type": "object", "additionalProperties": False, "required": ["model", "name"],
        "properties": {
            "model": {"type": "string", "minLength": 1, "maxLength": 200,
                      "description": "NAME, NAME@alias or NAME/version of a registered model."},
            "name": {"type": "string", "pattern": DNS_LABEL},
            "profile": {"type": "string", "pattern": DNS_LABEL},
            "min_replicas": {"type": "integer", "minimum": 0, "maximum": 100},
            "max_replicas": {"type": "integer", "minimum": 0, "maximum": 100},
            "canary_percent": {"type": "integer", "minimum": 1, "maximum": 99},
        },
    },
    "Deployment": {"type": "object", "required": ["name", "model", "version", "url", "state", "backend", "created"],
                   "properties": {"name": {"type": "string"}, "model": {"type": "string"},
                                  "version": {"type": "integer"}, "url": {"type": "string"},
                                  "state": {"type": "string", "enum": ["ready", "starting", "failed", "dead"]},
                                  "backend": {"type": "string"}, "created": {"type": "number"},
                                  "message": {"type": "string"}, "pid": {"type": "integer", "nullable": True},
                                  "canary": {"type": "object", "nullable": True,
                                             "description": "KServe canary beside the stable version (model, "
                                                            "version): its traffic share and readiness.",
                                             "required": ["model", "version", "percent", "name", "ready"],
                                             "properties": {"model": {"type": "string"},
                                                            "version": {"type": "integer"},
                                                            "percent": {"type": "integer"},
                                                            "name": {"type": "string"},
                                                            "ready": {"type": "boolean", "nullable": True}}}}},
    "Profile": {"type": "object", "required": ["name", "display", "gpu"],
                "properties": {"name": {"type": "string"}, "display": {"type": "string"},
                               "description": {"type": "string"}, "gpu": {"type": "string"},
                               "gpus": {"type": "integer"}, "hourly_cost": {"type": "number", "nullable": True},
                               "default": {"type": "boolean"},
                               "available": {"type": "integer", "nullable": True,
                                             "description": "How many more pods of this profile fit now "
                                                            "(null: CPU profile, or availability unknown)."},
                               "free": {"type": "integer", "nullable": True},
                               "total": {"type": "integer", "nullable": True}}},
    "Info": {"type": "object", "required": ["version", "user", "training", "serving"],
             "properties": {"version": {"type": "string"}, "user": {"type": "string"},
                            "training": {"type": "string", "enum": ["job", "pytorchjob", "trainjob"]},
                            "serving": {"type": "string", "enum": ["kserve", "deployment"]},
                            "namespace": {"type": "string"}}},
}


def _resp(schema_ref: str | None, description: str, array: bool = False) -> dict[str, Any]:
    if schema_ref is None:
        return {"description": description}
    schema: dict[str, Any] = {"$ref": f"#/components/schemas/{schema_ref}"}
    if array:
        schema = {"type": "array", "items": schema}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad input: the error says which field and how to fix it.",
            401: "No token, or a token the hub does not recognise.",
            403: "The token lacks the scope, or the object belongs to another user, or policy refuses.",
            404: "No such object.", 409: "Conflicts with the current state.",
            502: "MLflow or Kubernetes failed.", 503: "Kubernetes did not answer."}
    return {str(c): _resp("Error", text[c]) for c in codes}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 253}}
DEP_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 253}}
RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
MODEL = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 253}}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 20}}
#: Oversized requests are refused by the proxy or the HTTP server before the service sees them.
TOO_LARGE = {"413": {"description": "Request body too large."}, "414": {"description": "URL too long."},
             "431": {"description": "Request header fields (or URL) too large."}}
AUTH = {**_errors(401, 403), **TOO_LARGE}


def document(server_url: str = "/services/hubml/api/v1") -> dict[str, Any]:
    """The OpenAPI document, with ``server_url`` (the service prefix + ``api/v1``) as its server."""
    jobs_scope = [{"hubToken": ["custom:hubml:jobs"]}]
    models_scope = [{"hubToken": ["custom:hubml:models"]}]
    dep_scope = [{"hubToken": ["custom:hubml:deployments"]}]
    any_scope = [{"hubToken": []}]
    paths = {
        "/": {"get": {"operationId": "info", "summary": "Who you are and what this cluster offers.",
                      "security": any_scope,
                      "responses": {"200": _resp("Info", "Service information."), **AUTH}}},
        "/profiles": {"get": {"operationId": "listProfiles", "security": any_scope,
                              "summary": "The profiles you may use, with current GPU availability.",
                              "responses": {"200": _resp("Profile", "Profiles.", array=True), **AUTH,
                                            **_errors(502, 503)}}},
        "/jobs": {
            "get": {"operationId": "listJobs", "summary": "Your training jobs, newest first.", "security": jobs_scope,
                    "responses": {"200": _resp("JobStatus", "Jobs.", array=True), **AUTH, **_errors(502, 503)}},
            "post": {"operationId": "createJob", "summary": "Start a distributed training job (%%train).",
                     "security": jobs_scope, "requestBody": _body("TrainRequest"),
                     "responses": {"201": _resp("JobStatus", "Created (pending)."), **AUTH,
                                   **_errors(400, 409, 502, 503)}},
        },
        "/jobs/{job_id}": {"get": {"operationId": "getJob", "security": jobs_scope, "parameters": [JOB_ID],
                                   "responses": {"200": _resp("JobStatus", "The job."), **AUTH,
                                                 **_errors(404, 502, 503)}}},
        "/jobs/{job_id}/cancel": {"post": {"operationId": "cancelJob", "security": jobs_scope,
                                           "parameters": [JOB_ID],
                                           "summary": "Stop every worker; idempotent on a finished job.",
                                           "responses": {"200": _resp("JobStatus", "The job after cancelling."),
                                                         **AUTH, **_errors(404, 409, 502, 503)}}},
        "/jobs/{job_id}/logs": {"get": {
            "operationId": "jobLogs", "security": jobs_scope, "summary": "Log lines since a cursor (long-poll).",
            "parameters": [JOB_ID,
                           {"name": "cursor", "in": "query", "required": False,
                            "schema": {"type": "string", "pattern": CURSOR_PATTERN,
                                       "maxLength": CURSOR_DOCUMENTED_LENGTH},
                            "description": "Opaque: the next_cursor of the previous answer; leave out to start."},
                           {"name": "wait", "in": "query", "required": False,
                            "schema": {"type": "number", "minimum": 0, "maximum": 30}}],
            "responses": {"200": _resp("LogChunk", "New lines and the cursor to pass next."), **AUTH,
                          **_errors(400, 404, 502, 503)}}},
        "/runs/{run_id}/metrics": {"get": {
            "operationId": "runMetrics", "security": jobs_scope, "parameters": [RUN_ID],
            "summary": "Metric history of one of your runs: {key: [[step, value], ...]}.",
            "responses": {"200": {"description": "Metrics.", "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": {"type": "array", "items": {
                    "type": "array", "items": {"type": "number"}}}}}}}, **AUTH, **_errors(404, 502)}}},
        "/models": {
            "get": {"operationId": "listModels", "security": models_scope,
                    "responses": {"200": _resp("RegisteredModel", "Your registered models.", array=True), **AUTH,
                                  **_errors(502)}},
            "post": {"operationId": "registerModel", "security": models_scope, "requestBody": _body("RegisterRequest"),
                     "responses": {"201": _resp("ModelVersion", "The new version."), **AUTH,
                                   **_errors(400, 404, 409, 502)}},
        },
        "/models/{name}/versions/{version}": {"get": {
            "operationId": "getModelVersion", "security": models_scope, "parameters": [MODEL, VERSION],
            "summary": "One version of your model with the input signature its MLmodel records (%predict errors).",
            "responses": {"200": _resp("ModelVersionDetail", "The version."), **AUTH, **_errors(403, 404, 502)}}},
        "/deployments": {
            "get": {"operationId": "listDeployments", "security": dep_scope,
                    "responses": {"200": _resp("Deployment", "Your deployments.", array=True), **AUTH,
                                  **_errors(502, 503)}},
            "post": {"operationId": "deploy", "security": dep_scope, "requestBody": _body("DeployRequest"),
                     "summary": "Serve a registered model version (replaces your deployment of that name).",
                     "responses": {"201": _resp("Deployment", "Created or updated."), **AUTH,
                                   **_errors(400, 404, 409, 502, 503)}},
        },
        "/deployments/{name}": {
            "get": {"operationId": "getDeployment", "security": dep_scope, "parameters": [DEP_NAME],
                    "responses": {"200": _resp("Deployment", "The deployment."), **AUTH,
                                  **_errors(404, 502, 503)}},
            "delete": {"operationId": "undeploy", "security": dep_scope, "parameters": [DEP_NAME],
                       "responses": {"204": _resp(None, "Removed with everything it created."), **AUTH,
                                     **_errors(404, 502, 503)}},
        },
        "/deployments/{name}/promote": {"post": {
            "operationId": "promoteCanary", "security": dep_scope, "parameters": [DEP_NAME],
            "summary": "The canary takes all traffic and becomes the stable version (KServe; no pod restarts).",
            "responses": {"200": _resp("Deployment", "Promoted."), **AUTH, **_errors(403, 404, 409, 502, 503)}}},
        "/deployments/{name}/rollback": {"post": {
            "operationId": "rollbackCanary", "security": dep_scope, "parameters": [DEP_NAME],
            "summary": "The stable version takes all traffic again and the canary is removed (KServe).",
            "responses": {"200": _resp("Deployment", "Rolled back."), **AUTH, **_errors(403, 404, 409, 502, 503)}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "hubml hub service", "version": API_VERSION,
                 "description": "Training jobs, models and deployments on the hub's Kubernetes cluster, for the "
                                "calling JupyterHub user only. Authenticate with a JupyterHub token: "
                                "`Authorization: token <JUPYTERHUB_API_TOKEN>`."},
        "servers": [{"url": server_url}],
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {"hubToken": {"type": "apiKey", "in": "header", "name": "Authorization",
                                             "description": "`token <JupyterHub API token>`"}},
        },
        "security": [{"hubToken": []}],
        "paths": paths,
    }


_VALIDATORS: dict[str, jsonschema.protocols.Validator] = {}


def validate(schema_name: str, value: Any) -> dict[str, Any]:
    """Check ``value`` against a request schema; ``InvalidRequest`` names the field and the rule."""
    validator = _VALIDATORS.get(schema_name)
    if validator is None:
        validator = jsonschema.Draft4Validator(SCHEMAS[schema_name])
        _VALIDATORS[schema_name] = validator
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "the request body"
        message = err.message if len(err.message) < 300 else err.message[:300] + "…"
        raise InvalidRequest(f"Invalid {where}: {message}. See the {schema_name} schema in "
                             f"GET api/{API_VERSION}/openapi.json.")
    return value
