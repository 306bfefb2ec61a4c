"""Kubernetes manifests of a model deployment, as plain dicts (no I/O).

``ServingPlan`` (validated field by field) -> ``inference_service`` (KServe
v1beta1, ``modelFormat: mlflow`` served by hubml's ServingRuntime, which
runs MLflow's own scoring server) or the ``scoring_deployment`` +
``scoring_service`` + ``scoring_hpa`` trio running the same server. Canary
traffic of an InferenceService is ``canary``'s business.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from hubml import names, scoring
from hubml.errors import InvalidRequest

from . import canary, storage_uris
from .endpoints import Endpoints, flavour_protocol
from .ownership import ANNOTATION_SPEC, ANNOTATION_USERNAME, KIND_SERVING, LABEL_DEPLOYMENT, LABEL_KIND, metadata, owner_labels, user_slug
from .pod_fields import check_resources, placement, security_context

SCORING_PORT = 8080


_STORAGE_URI_RE = re.compile(r"^(s3|gs|https?|pvc|hdfs|webhdfs|oci|hf|azure|file|mlflow-artifacts|models|runs):/[^\s;|&$`]+$")


@dataclass(frozen=True)
class ServingPlan:
    """A deployment of one registered model version."""

    name: str
    namespace: str
    username: str
    model: str                  # "iris-clf@champion" as asked
    model_name: str
    version: int
    storage_uri: str
    image: str                  # the scoring server image (Deployment flavour)
    min_replicas: int = 1
    max_replicas: int = 1
    canary_percent: int | None = None
    resources: dict[str, dict[str, str]] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    node_affinity: list[dict[str, Any]] = field(default_factory=list)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    pod_labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # MLFLOW_TRACKING_URI for the scoring server
    target_cpu_utilization: int = 70
    created: float = 0.0
    #: KServe: the (Cluster)ServingRuntime to use ("" lets KServe pick one for modelFormat mlflow, i.e. MLServer
    #: speaking the Open Inference Protocol) and the deployment mode annotation of a new InferenceService
    runtime: str = ""
    deployment_mode: str = "Standard"

    def validate(self) -> "ServingPlan":
        names.dns_label(self.name, "Deployment name")
        names.dns_label(self.namespace, "Namespace")
        user_slug(self.username)
        names.model_name(self.model_name)
        names.image_reference(self.image)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise InvalidRequest(f"Model version must be a positive whole number; got {self.version!r}.")
        if not isinstance(self.storage_uri, str) or not _STORAGE_URI_RE.match(self.storage_uri):
            raise InvalidRequest(
                f"storageUri {self.storage_uri!r} is not a location KServe can download a model from "
                "(s3://, gs://, https://, pvc://, mlflow-artifacts://…)."
            )
        for flag, value, low, high in (("min_replicas", self.min_replicas, 0, 100),
                                       ("max_replicas", self.max_replicas, 1, 100),
                                       ("target_cpu_utilization", self.target_cpu_utilization, 1, 100)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidRequest(f"{flag} must be a whole number from {low} to {high}; got {value!r}.")
        if self.max_replicas < self.min_replicas:
            raise InvalidRequest("max_replicas must be at least min_replicas.")
        if self.canary_percent is not None and (
                isinstance(self.canary_percent, bool) or not isinstance(self.canary_percent, int)
                or not 0 < self.canary_percent < 100):
            raise InvalidRequest(f"canary must be a percentage from 1 to 99; got {self.canary_percent!r}.")
        if self.runtime:
            names.dns_label(self.runtime, "KServe serving runtime")
        if self.deployment_mode not in canary.MODES:
            raise InvalidRequest(f"KServe deployment mode must be one of {', '.join(canary.MODES)}; "
                                 f"got {self.deployment_mode!r}.")
        check_resources(self.resources)
        names.labels(self.node_selector, "node selector")
        names.labels(self.pod_labels, "pod labels")
        if not isinstance(self.env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in self.env.items()):
            raise InvalidRequest("env must map names to strings.")
        return self

    @property
    def model_uri(self) -> str:
        """What the scoring server loads: the registry URI, resolved through MLFLOW_TRACKING_URI."""
        return f"models:/{self.model_name}/{self.version}"

    def labels(self) -> dict[str, str]:
        return {**owner_labels(self.username, KIND_SERVING), LABEL_DEPLOYMENT: self.name}

    def annotations(self) -> dict[str, str]:
        record = {"model": self.model, "model_name": self.model_name, "version": self.version,
                  "created": self.created}
        return {ANNOTATION_USERNAME: self.username,
                ANNOTATION_SPEC: json.dumps(record, sort_keys=True, separators=(",", ":"))}


def inference_service(plan: ServingPlan) -> dict[str, Any]:
    """KServe ``InferenceService`` v1beta1 serving the MLflow model at ``storageUri`` to all traffic.

    With ``plan.runtime`` (hubml's ``hubml-mlflow`` ServingRuntime) the
    predictor runs ``mlflow models serve`` on the files KServe's storage
    initializer put in ``/mnt/models``, speaking MLflow's ``/invocations``
    protocol; without it KServe picks its own runtime for ``mlflow`` (MLServer,
    Open Inference Protocol v2). A canary is added to this by ``canary``.
    """
    plan.validate()
    if not storage_uris.is_readable(plan.storage_uri):
        raise InvalidRequest(f"storageUri {plan.storage_uri!r} is not a location KServe's storage initializer "
                             f"reads ({', '.join(s + '://' for s in storage_uris.READABLE_SCHEMES)}).")
    model: dict[str, Any] = {"modelFormat": {"name": "mlflow"}, "storageUri": plan.storage_uri}
    if plan.runtime:
        model["runtime"] = plan.runtime
    else:
        model["protocolVersion"] = "v2"
    if plan.resources:
        model["resources"] = {k: dict(v) for k, v in plan.resources.items() if v}
    if plan.env:
        model["env"] = [{"name": k, "value": v} for k, v in sorted(plan.env.items())]
    predictor: dict[str, Any] = {"minReplicas": plan.min_replicas, "maxReplicas": plan.max_replicas,
                                 "model": model, **placement(plan.node_selector, plan.node_affinity, plan.tolerations)}
    annotations = {**plan.annotations(), canary.MODE_ANNOTATION: plan.deployment_mode}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": metadata(plan.name, plan.namespace, plan.labels(), annotations),
            "spec": {"predictor": predictor}}


def scoring_deployment(plan: ServingPlan) -> dict[str, Any]:
    """``apps/v1`` Deployment running ``mlflow models serve`` on the registered version."""
    plan.validate()
    selector = {LABEL_DEPLOYMENT: plan.name, LABEL_KIND: KIND_SERVING}
    container: dict[str, Any] = {
        "name": "scoring",
        "image": plan.image,
        "command": ["mlflow", "models", "serve", "--model-uri", plan.model_uri, "--host", "0.0.0.0",
                    "--port", str(SCORING_PORT), "--env-manager", "local"],
        "env": [{"name": k, "value": v} for k, v in sorted(plan.env.items())],
        "ports": [{"name": "http", "containerPort": SCORING_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ping", "port": SCORING_PORT}, "periodSeconds": 5},
        "securityContext": security_context(),
    }
    if plan.resources:
        container["resources"] = {k: dict(v) for k, v in plan.resources.items() if v}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": metadata(plan.name, plan.namespace, plan.labels(), plan.annotations()),
            "spec": {"replicas": max(plan.min_replicas, 1),
                     "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": {**plan.pod_labels, **plan.labels()},
                                               "annotations": {ANNOTATION_USERNAME: plan.username}},
                                  "spec": {"automountServiceAccountToken": False, "enableServiceLinks": False,
                                           "containers": [container], **placement(plan.node_selector, plan.node_affinity, plan.tolerations)}}}}


def scoring_service(plan: ServingPlan, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": metadata(plan.name, plan.namespace, plan.labels(), {ANNOTATION_USERNAME: plan.username}, owner),
            "spec": {"selector": {LABEL_DEPLOYMENT: plan.name, LABEL_KIND: KIND_SERVING},
                     "ports": [{"name": "http", "port": 80, "targetPort": SCORING_PORT, "protocol": "TCP"}]}}


def scoring_hpa(plan: ServingPlan, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """``autoscaling/v2`` HPA between min (at least 1: HPA cannot scale to zero) and max replicas."""
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": metadata(plan.name, plan.namespace, plan.labels(), {ANNOTATION_USERNAME: plan.username}, owner),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": plan.name},
                     "minReplicas": max(plan.min_replicas, 1),
                     "maxReplicas": max(plan.max_replicas, 1),
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": plan.target_cpu_utilization}}}]}}


def deployment_url(name: str, namespace: str, kserve: bool) -> str:
    """The default in-cluster URL answering predictions (see ``endpoints`` for the configurable one)."""
    flavour = "kserve" if kserve else "deployment"
    return Endpoints().base_url(flavour, name, namespace, user="") + scoring.protocol_path(flavour_protocol(flavour),
                                                                                           name)

