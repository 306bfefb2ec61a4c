"""Kubernetes manifests of a training job, as plain dicts (no I/O).

Why pure builders: like KubeSpawner's ``objects.py``, everything that decides the
*shape* of what lands in the cluster lives here, so it is tested without a
cluster and reviewed in one place; ``kube.py`` only sends the dicts.

``TrainingPlan`` (validated field by field) -> ``indexed_job`` (one pod per
worker, ``completionMode: Indexed``, each pod running ``torch.distributed.run``
with the c10d rendezvous at pod 0 through ``rendezvous_service``, a headless
Service), or ``pytorch_job`` (Kubeflow ``PyTorchJob`` v1) where the operator is
installed, or ``train_job`` (Kubeflow Trainer ``TrainJob`` v1alpha1 on a training
runtime); ``code_config_map`` ships the cell; ``training_network_policy`` lets
the pods reach each other, DNS and MLflow only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from hubml import names
from hubml.errors import InvalidRequest
from hubml.profiles import KUEUE_QUEUE_LABEL

from .ownership import (ANNOTATION_SPEC, ANNOTATION_USERNAME, COMPLETION_INDEX_ANNOTATION, KIND_TRAINING, LABEL_JOB,
                     LABEL_KIND, metadata, owner_labels, user_slug)
from .pod_fields import QUANTITY_RE, check_env, check_resources, placement, security_context

RDZV_PORT = 29400


CODE_MOUNT = "/hubml/code"


CODE_FILE = "train.py"


@dataclass(frozen=True)
class TrainingPlan:
    """Everything a training job's objects are made of, decided by policy beforehand."""

    job_id: str
    namespace: str
    username: str
    image: str
    code: str
    workers: int
    nproc_per_node: int = 1
    resources: dict[str, dict[str, str]] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    node_affinity: list[dict[str, Any]] = field(default_factory=list)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)           # the user's --env
    system_env: dict[str, str] = field(default_factory=dict)    # MLFLOW_*, HUBML_JOB_ID
    pod_labels: dict[str, str] = field(default_factory=dict)    # from the profile
    pod_annotations: dict[str, str] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)        # JobStatus fields kept on the Job
    backoff_limit: int = 0
    ttl_seconds_after_finished: int = 7 * 86400
    active_deadline_seconds: int | None = None
    shm_size: str = "1Gi"
    python: str = "python"
    suspend: bool = False

    def validate(self) -> "TrainingPlan":
        names.dns_label(self.job_id, "Job id")
        if len(self.job_id) > 40:
            raise InvalidRequest(f"Job id {self.job_id!r} is longer than 40 characters (pod names derive from it).")
        names.dns_label(self.namespace, "Namespace")
        user_slug(self.username)
        names.image_reference(self.image)
        if not isinstance(self.code, str) or not self.code.strip():
            raise InvalidRequest("The training code is empty.")
        for flag, value, low, high in (("workers", self.workers, 1, 256), ("nproc_per_node", self.nproc_per_node, 1, 16),
                                       ("backoff_limit", self.backoff_limit, 0, 100),
                                       ("ttl_seconds_after_finished", self.ttl_seconds_after_finished, 0, 10 ** 8)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidRequest(f"{flag} must be a whole number from {low} to {high}; got {value!r}.")
        if self.active_deadline_seconds is not None and (
                isinstance(self.active_deadline_seconds, bool) or not isinstance(self.active_deadline_seconds, int)
                or self.active_deadline_seconds < 1):
            raise InvalidRequest("active_deadline_seconds must be a positive whole number of seconds.")
        check_resources(self.resources)
        names.labels(self.node_selector, "node selector")
        names.labels(self.pod_labels, "pod labels")
        names.annotations(self.pod_annotations, "pod annotations")
        check_env(self.env)
        if not isinstance(self.system_env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.system_env.items()):
            raise InvalidRequest("system env must map names to strings.")
        if not QUANTITY_RE.match(self.shm_size):
            raise InvalidRequest(f"shm_size {self.shm_size!r} is not a quantity such as '1Gi'.")
        for tol in self.tolerations:
            if not isinstance(tol, dict):
                raise InvalidRequest("tolerations must be dicts.")
        return self

    # names of the objects
    @property
    def job_name(self) -> str:
        return self.job_id

    @property
    def service_name(self) -> str:
        return self.job_id

    @property
    def config_map_name(self) -> str:
        return f"{self.job_id}-code"

    @property
    def rendezvous_endpoint(self) -> str:
        """Pod 0's stable DNS name: ``<job>-0.<service>`` (Indexed Job hostname + subdomain)."""
        return f"{self.job_id}-0.{self.service_name}:{RDZV_PORT}"

    def labels(self) -> dict[str, str]:
        return {**owner_labels(self.username, KIND_TRAINING), LABEL_JOB: self.job_id}

    def workload_labels(self) -> dict[str, str]:
        """The job object's labels: Kueue reads the queue label on the Job (PyTorchJob, TrainJob), not its pods."""
        queue = {KUEUE_QUEUE_LABEL: self.pod_labels[KUEUE_QUEUE_LABEL]} if KUEUE_QUEUE_LABEL in self.pod_labels else {}
        return {**self.labels(), **queue}

    def annotations(self) -> dict[str, str]:
        return {ANNOTATION_USERNAME: self.username,
                ANNOTATION_SPEC: json.dumps(self.record, sort_keys=True, separators=(",", ":"))}


def _container_env(plan: TrainingPlan) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(plan.env.items())]
    env += [{"name": k, "value": v} for k, v in sorted(plan.system_env.items())]
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    return env


def _pod_spec(plan: TrainingPlan, container: dict[str, Any], *, subdomain: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [
            {"name": "code", "configMap": {"name": plan.config_map_name, "defaultMode": 0o444}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": plan.shm_size}},
        ],
    }
    if subdomain:
        spec["subdomain"] = subdomain
    spec.update(placement(plan.node_selector, plan.node_affinity, plan.tolerations))
    return spec


def _container(plan: TrainingPlan, name: str, command: list[str], extra_env: list[dict[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "image": plan.image,
        "command": command,
        "env": extra_env + _container_env(plan),
        "volumeMounts": [{"name": "code", "mountPath": CODE_MOUNT, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": security_context(),
        "ports": [{"name": "rdzv", "containerPort": RDZV_PORT, "protocol": "TCP"}],
    }
    if plan.resources:
        c["resources"] = {k: dict(v) for k, v in plan.resources.items() if v}
    return c


def torchrun_command(plan: TrainingPlan) -> list[str]:
    """The worker command: ``torch.distributed.run`` with the c10d rendezvous at pod 0.

    ``$(NODE_RANK)`` is expanded by the kubelet from the container's env, which
    reads the pod's completion index through the downward API.
    """
    return [
        plan.python, "-m", "torch.distributed.run",
        "--nnodes", str(plan.workers),
        "--nproc-per-node", str(plan.nproc_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", plan.rendezvous_endpoint,
        "--rdzv-id", plan.job_id,
        "--node-rank", "$(NODE_RANK)",
        "--max-restarts", "0",
        f"{CODE_MOUNT}/{CODE_FILE}",
    ]


def indexed_job(plan: TrainingPlan) -> dict[str, Any]:
    """A ``batch/v1`` Job with one pod per worker (``completionMode: Indexed``).

    The service creates its ConfigMap, Service and NetworkPolicy before it
    (see ``training.py``), so no pod starts before its code and network rules
    exist. ``suspend`` is kept for callers that want to hold the pods.
    """
    plan.validate()
    rank_env = [{"name": "NODE_RANK", "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}}]
    container = _container(plan, "worker", torchrun_command(plan), rank_env)
    pod_labels = {**plan.pod_labels, **plan.labels()}
    pod_annotations = {**plan.pod_annotations, ANNOTATION_USERNAME: plan.username}
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": plan.workers,
        "parallelism": plan.workers,
        "backoffLimit": plan.backoff_limit,
        "ttlSecondsAfterFinished": plan.ttl_seconds_after_finished,
        "suspend": plan.suspend,
        # a finished worker must not be restarted alone: the rendezvous is gone
        "podReplacementPolicy": "Failed",
        "template": {
            "metadata": {"labels": pod_labels, "annotations": pod_annotations},
            "spec": _pod_spec(plan, container, subdomain=plan.service_name),
        },
    }
    if plan.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = plan.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": metadata(plan.job_name, plan.namespace, plan.workload_labels(), plan.annotations()),
            "spec": spec}


def pytorch_job(plan: TrainingPlan) -> dict[str, Any]:
    """A Kubeflow ``PyTorchJob`` (kubeflow.org/v1): Master (rank 0) + Workers.

    The training operator injects ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
    ``PET_MASTER_ADDR``… which ``torch.distributed.run`` reads, so the command
    only names the script.
    """
    plan.validate()
    command = [plan.python, "-m", "torch.distributed.run", f"{CODE_MOUNT}/{CODE_FILE}"]
    pod_labels = {**plan.pod_labels, **plan.labels()}
    pod_annotations = {**plan.pod_annotations, ANNOTATION_USERNAME: plan.username}

    def replica(count: int) -> dict[str, Any]:
        container = _container(plan, "pytorch", command, [])
        return {"replicas": count, "restartPolicy": "Never",
                "template": {"metadata": {"labels": pod_labels, "annotations": pod_annotations},
                             "spec": _pod_spec(plan, container, subdomain=None)}}

    replicas = {"Master": replica(1)}
    if plan.workers > 1:
        replicas["Worker"] = replica(plan.workers - 1)
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": plan.backoff_limit,
                                  "ttlSecondsAfterFinished": plan.ttl_seconds_after_finished,
                                  "suspend": plan.suspend}
    if plan.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = plan.active_deadline_seconds
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": metadata(plan.job_name, plan.namespace, plan.workload_labels(), plan.annotations()),
            "spec": {"nprocPerNode": str(plan.nproc_per_node), "runPolicy": run_policy,
                     "pytorchReplicaSpecs": replicas}}


#: Kubeflow Trainer: the replicated job (and its container) a Torch runtime trains in.
TRAINER_NODE = "node"


TRAINER_API_GROUP = "trainer.kubeflow.org"


TRAINER_RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")


#: Label JobSet puts on every pod of a JobSet; the Trainer names the JobSet after the TrainJob.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"


_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class TrainerRuntime:
    """The (Cluster)TrainingRuntime a ``TrainJob`` runs on (``HubMLService.trainjob_runtime``).

    Default: the Trainer's stock ``torch-distributed`` ClusterTrainingRuntime,
    whose ``node`` replicated job runs one pod per node and injects the
    ``PET_*`` variables ``torch.distributed.run`` reads.
    """

    name: str = "torch-distributed"
    kind: str = "ClusterTrainingRuntime"

    def validate(self) -> "TrainerRuntime":
        if not isinstance(self.name, str) or len(self.name) > 253 or not _DNS_SUBDOMAIN_RE.match(self.name):
            raise InvalidRequest(
                f"Training runtime name {self.name!r} is not a Kubernetes object name (lower-case letters, digits, "
                f"'-' and '.'); set HubMLService.trainjob_runtime to the name of an installed runtime, such as "
                f"'torch-distributed'."
            )
        if self.kind not in TRAINER_RUNTIME_KINDS:
            raise InvalidRequest(
                f"Training runtime kind {self.kind!r} is neither of {', '.join(TRAINER_RUNTIME_KINDS)}; set "
                f"HubMLService.trainjob_runtime_kind to one of them."
            )
        return self


def trainjob_node_selector(node_selector: dict[str, str], node_affinity: list[dict[str, Any]]) -> dict[str, str]:
    """The profile's placement as the exact-match node selector a Trainer v2.0 override can carry.

    ``podSpecOverrides`` has ``nodeSelector`` and ``tolerations`` but no
    ``affinity``. A required ``key In [values]`` term is kept exactly when it
    has one value (it becomes ``key: value``) or the profile's own node
    selector already pins ``key`` to one of the values; any other term would
    be dropped, and dropping the GPU-model term could place a job on a GPU of
    a model (or a group-restricted pool) its profile does not give, so it is
    refused with what to change.
    """
    selector = dict(node_selector)
    for expr in node_affinity:
        key, op, values = expr.get("key"), expr.get("operator"), list(expr.get("values") or ())
        if op == "In" and key in selector and selector[key] in values:
            continue
        if op == "In" and len(values) == 1 and selector.get(key, values[0]) == values[0]:
            selector[key] = values[0]
            continue
        raise InvalidRequest(
            f"The Kubeflow TrainJob flavour cannot express the profile's node rule {key} {op} {values} (Trainer "
            f"podSpecOverrides take an exact node selector, no affinity). Add node_selector: {{{key!r}: <the value "
            f"your nodes carry, e.g. {values[-1]!r}>}} to the profile, or set HubMLService.training_flavour to "
            f"'job' or 'pytorchjob'."
        )
    names.labels(selector, "node selector")
    return selector


#: The Trainer's API caps ``trainer.env``.
TRAINJOB_MAX_ENV = 128


def trainjob_env_check(user_env: dict[str, str], system_names: tuple[str, ...]) -> None:
    """Refuse ``--env`` a TrainJob cannot carry: the Torch runtime's ``PET_*`` names, or too many."""
    reserved = sorted(name for name in user_env if name.startswith("PET_"))
    if reserved:
        raise InvalidRequest(
            f"--env {', '.join(reserved)}: PET_* variables are set by the Kubeflow Trainer's Torch runtime "
            f"(nodes, rank, master address) and cannot be given; remove them from --env."
        )
    total = len({*user_env, *system_names, "PYTHONUNBUFFERED"})
    if total > TRAINJOB_MAX_ENV:
        raise InvalidRequest(f"A TrainJob takes at most {TRAINJOB_MAX_ENV} environment variables; this job has "
                             f"{total}. Pass fewer --env values.")


def train_job(plan: TrainingPlan, runtime: TrainerRuntime = TrainerRuntime()) -> dict[str, Any]:
    """A Kubeflow Trainer ``TrainJob`` (trainer.kubeflow.org/v1alpha1, the v2.0 API) on ``runtime``.

    The runtime decides the pods (a JobSet with a ``node`` replicated job);
    hubml sets what the TrainJob API lets a job set: ``trainer`` (image, the
    command, env, ``numNodes``, ``numProcPerNode``, ``resourcesPerNode``) and a
    ``podSpecOverrides`` entry for the ``node`` job that mounts the code
    ConfigMap and /dev/shm and places the pods (node selector, tolerations).
    The Torch plugin injects ``PET_NNODES``/``PET_NODE_RANK``/``PET_MASTER_ADDR``…,
    which ``torch.distributed.run`` reads, so the command only names the script.
    ``spec.labels`` reach the JobSet and its Jobs; pods carry the JobSet's
    ``jobset.sigs.k8s.io/jobset-name`` (= the job id), which the NetworkPolicy
    and hubml's pod lookups select on. Pod hardening (no service-account
    token, security context) is the runtime's: v2.0 overrides cannot set it.
    """
    plan.validate()
    runtime.validate()
    selector = trainjob_node_selector(plan.node_selector, plan.node_affinity)
    trainjob_env_check(plan.env, tuple(plan.system_env))
    # one entry per name (the API keys the list by name): the service's variables win
    env = {**plan.env, **plan.system_env, "PYTHONUNBUFFERED": "1"}
    trainer: dict[str, Any] = {
        "image": plan.image,
        "command": [plan.python, "-m", "torch.distributed.run", f"{CODE_MOUNT}/{CODE_FILE}"],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "numNodes": plan.workers,
        "numProcPerNode": plan.nproc_per_node,
    }
    if plan.resources:
        trainer["resourcesPerNode"] = {k: dict(v) for k, v in plan.resources.items() if v}
    override: dict[str, Any] = {
        "targetJobs": [{"name": TRAINER_NODE}],
        "volumes": [
            {"name": "hubml-code", "configMap": {"name": plan.config_map_name, "defaultMode": 0o444}},
            {"name": "hubml-dshm", "emptyDir": {"medium": "Memory", "sizeLimit": plan.shm_size}},
        ],
        "containers": [{"name": TRAINER_NODE, "volumeMounts": [
            {"name": "hubml-code", "mountPath": CODE_MOUNT, "readOnly": True},
            {"name": "hubml-dshm", "mountPath": "/dev/shm"}]}],
    }
    if selector:
        override["nodeSelector"] = selector
    if plan.tolerations:
        override["tolerations"] = [dict(t) for t in plan.tolerations]
    spec: dict[str, Any] = {
        "runtimeRef": {"name": runtime.name, "apiGroup": TRAINER_API_GROUP, "kind": runtime.kind},
        "trainer": trainer,
        "labels": {**plan.pod_labels, **plan.labels()},
        "annotations": {**plan.pod_annotations, ANNOTATION_USERNAME: plan.username},
        "podSpecOverrides": [override],
        "suspend": plan.suspend,
    }
    if plan.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = plan.active_deadline_seconds
    return {"apiVersion": f"{TRAINER_API_GROUP}/v1alpha1", "kind": "TrainJob",
            "metadata": metadata(plan.job_name, plan.namespace, plan.workload_labels(), plan.annotations()),
            "spec": spec}


def rendezvous_service(plan: TrainingPlan, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """Headless Service giving pod 0 the name the other workers rendezvous at.

    ``publishNotReadyAddresses`` because the workers look pod 0 up before any
    readiness probe could pass.
    """
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": metadata(plan.service_name, plan.namespace, plan.labels(),
                              {ANNOTATION_USERNAME: plan.username}, owner),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {LABEL_JOB: plan.job_id, LABEL_KIND: KIND_TRAINING},
                     "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}]}}


def code_config_map(plan: TrainingPlan, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cell's code, mounted read-only at ``/hubml/code/train.py`` in every worker."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(plan.config_map_name, plan.namespace, plan.labels(),
                              {ANNOTATION_USERNAME: plan.username}, owner),
            "immutable": True,
            "data": {CODE_FILE: plan.code}}


@dataclass(frozen=True)
class EgressRule:
    """Where training pods may connect besides each other and DNS (MLflow)."""

    to: list[dict[str, Any]]          # NetworkPolicyPeer dicts (ipBlock / namespaceSelector+podSelector)
    ports: list[dict[str, Any]]       # NetworkPolicyPort dicts


def training_network_policy(plan: TrainingPlan, mlflow: list[EgressRule],
                            owner: dict[str, Any] | None = None, *,
                            pod_selector: dict[str, str] | None = None) -> dict[str, Any]:
    """Ingress only from the job's own pods; egress only to them, DNS and MLflow.

    Training code is arbitrary user code with the user's data: no internet
    egress means no exfiltration and no surprise downloads. ``pod_selector``
    names the job's pods where they do not carry ``hubml.io/job`` (a TrainJob's
    pods carry ``jobset.sigs.k8s.io/jobset-name``: ``trainjob_pod_selector``).
    """
    match = dict(pod_selector) if pod_selector else {LABEL_JOB: plan.job_id}
    same_job = [{"podSelector": {"matchLabels": match}}]
    dns = {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    egress = [{"to": same_job}, dns] + [{"to": r.to, "ports": r.ports} for r in mlflow]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": metadata(plan.job_id, plan.namespace, plan.labels(),
                              {ANNOTATION_USERNAME: plan.username}, owner),
            "spec": {"podSelector": {"matchLabels": dict(match)},
                     "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": same_job}],
                     "egress": egress}}


def trainjob_pod_selector(job_id: str) -> dict[str, str]:
    """Labels of a TrainJob's pods: its JobSet's name, which the Trainer sets to the TrainJob's."""
    return {JOBSET_NAME_LABEL: job_id}


def mlflow_egress_from_uri(uri: str) -> list[EgressRule]:
    """Default egress rule for a tracking URI: its port to any address in the cluster.

    Admins who know where MLflow runs set ``HubMLService.mlflow_egress`` to a
    tighter peer (namespaceSelector + podSelector); this default still blocks
    the internet for the common in-cluster ``http://mlflow.<ns>:5000``.
    """
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return [EgressRule(to=[{"namespaceSelector": {}}], ports=[{"protocol": "TCP", "port": port}])]

