"""Where notebook pods reach a deployment: the URL ``%predict`` posts to (pure, no I/O).

Why a setting: the hub service creates the serving objects, but *how* a
notebook pod reaches them is the cluster's business. By default a Service's
in-cluster DNS name works (notebook pods run in the same cluster), but a cluster
that exposes models through an ingress or a gateway (or a NetworkPolicy that only
lets notebooks reach that gateway) needs another base URL. The administrator
gives it as ``HubMLService.deployment_url_template``; hubml appends the path of
the serving protocol itself (``hubml.scoring.protocol_path``: ``/invocations``
for MLflow's scoring server, which hubml's KServe runtime runs too,
``/v2/models/<name>/infer`` for an InferenceService on KServe's own MLflow
runtime, Open Inference Protocol), so the
template only says where the server is, never which protocol it speaks.

For KServe the InferenceService itself reports where it answers, once its
controller has reconciled it: ``status.address.url`` (cluster-local, e.g.
``http://NAME-predictor.NS.svc.cluster.local``, or
``NAME-PREDICTOR-predictor`` once a Standard-mode canary named PREDICTOR was promoted) and ``status.url`` (through the
ingress domain, e.g. ``http://NAME-NS.example.com``). That report is preferred
over any template (``kserve_url_field`` picks which of the two), because it is
what the KServe installation actually routes; the template is the fallback until
KServe has set it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from hubml import scoring

from .ownership import LABEL_USER

#: Placeholders a template may use; each value is a DNS label or a label-safe slug, so safe in a host or path.
PLACEHOLDERS = ("name", "namespace", "user", "flavour")
FLAVOURS = ("deployment", "kserve")

#: Built-in base URLs: the Service the Deployment flavour creates, and KServe's predictor Service.
DEFAULT_TEMPLATES = {
    "deployment": "http://{name}.{namespace}.svc.cluster.local",
    "kserve": "http://{name}-predictor.{namespace}.svc.cluster.local",
}
#: Which field of an InferenceService's status to prefer (``none``: always the template).
KSERVE_URL_FIELDS = ("address", "url", "none")

_SAMPLE = {"name": "model-a", "namespace": "hubml-jobs", "user": "alice", "flavour": "kserve"}


def flavour_protocol(flavour: str) -> str:
    """The scoring protocol a serving flavour speaks by default: MLflow's (``mlflow models serve``) for both,
    since hubml's KServe runtime runs that same server."""
    return scoring.MLFLOW


def isvc_protocol(obj: dict[str, Any]) -> str:
    """What an InferenceService's predictor speaks: the Open Inference Protocol when it asks for
    ``protocolVersion: v2`` (KServe's own MLflow runtime, MLServer), else MLflow's (hubml's runtime)."""
    model = (((obj.get("spec") or {}).get("predictor") or {}).get("model") or {})
    return scoring.OPEN_INFERENCE if model.get("protocolVersion") == "v2" else scoring.MLFLOW


def check_template(template: str) -> str:
    """Validate an administrator's base-URL template; returns it without a trailing ``/``.

    Raises ``ValueError`` naming what is wrong: unknown or malformed placeholders,
    a scheme other than http(s), no host, or a query/fragment (hubml appends the
    protocol path, which a query or fragment would swallow).
    """
    if not isinstance(template, str) or not template.strip():
        raise ValueError("deployment_url_template is empty; leave it unset for the in-cluster default.")
    if any(c.isspace() for c in template):
        raise ValueError(f"deployment_url_template {template!r} contains whitespace; a URL has none.")
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"deployment_url_template {template!r} is not a valid template ({e}); write "
                         f"placeholders as {{name}} and literal braces as {{{{ }}}}.") from None
    for _, field_name, spec, conversion in fields:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS or spec or conversion:
            shown = "{" + field_name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"deployment_url_template {template!r} uses {shown}; the placeholders are "
                             + ", ".join("{" + p + "}" for p in PLACEHOLDERS) + " (no formats or attributes).")
    sample = urlsplit(template.format(**_SAMPLE))
    if sample.scheme not in ("http", "https") or not sample.hostname:
        raise ValueError(f"deployment_url_template {template!r} must be an http:// or https:// URL with a host, "
                         f"e.g. https://models.example.org/{{namespace}}/{{name}}.")
    if sample.query or sample.fragment or "?" in template or "#" in template:
        raise ValueError(f"deployment_url_template {template!r} has a query or fragment; give only the base URL "
                         f"(hubml appends /invocations or /v2/models/NAME/infer).")
    try:
        sample.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"deployment_url_template {template!r} has a bad port: {e}.") from None
    return template.rstrip("/")


def _kserve_reported(status: dict[str, Any], field: str) -> str:
    """The base URL an InferenceService's status reports (KServe's controller sets it), or ''."""
    if field == "address":
        url = (status.get("address") or {}).get("url")
    elif field == "url":
        url = status.get("url")
    else:
        return ""
    if not isinstance(url, str):
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        return ""
    return url.rstrip("/")


@dataclass(frozen=True)
class Endpoints:
    """How notebook pods reach deployments (``HubMLService.deployment_url_template``, ``kserve_url_field``)."""

    template: str = ""              # empty: DEFAULT_TEMPLATES per flavour
    kserve_url_field: str = "address"

    def validate(self) -> "Endpoints":
        if self.template:
            check_template(self.template)
        if self.kserve_url_field not in KSERVE_URL_FIELDS:
            raise ValueError(f"kserve_url_field must be one of {', '.join(KSERVE_URL_FIELDS)}; "
                             f"got {self.kserve_url_field!r}.")
        return self

    def base_url(self, flavour: str, name: str, namespace: str, user: str) -> str:
        template = self.template or DEFAULT_TEMPLATES[flavour]
        return template.format(name=name, namespace=namespace, user=user, flavour=flavour).rstrip("/")

    def url_for(self, obj: dict[str, Any]) -> str:
        """The prediction URL of an InferenceService or a scoring Deployment, as the API server reports it."""
        meta = obj.get("metadata") or {}
        name, namespace = meta.get("name", ""), meta.get("namespace", "")
        user = (meta.get("labels") or {}).get(LABEL_USER, "")
        flavour = "kserve" if obj.get("kind") == "InferenceService" else "deployment"
        base = ""
        if flavour == "kserve":
            base = _kserve_reported(obj.get("status") or {}, self.kserve_url_field)
        if not base:
            base = self.base_url(flavour, name, namespace, user)
            predictor_name = (((obj.get("spec") or {}).get("predictor") or {}).get("name") or "")
            if flavour == "kserve" and not self.template and predictor_name:
                # Standard mode after a promotion: the stable predictor (and its Service) carries the name
                base = self.base_url(flavour, f"{name}-{predictor_name}", namespace, user)
        protocol = isvc_protocol(obj) if flavour == "kserve" else flavour_protocol(flavour)
        return base + scoring.protocol_path(protocol, name)
