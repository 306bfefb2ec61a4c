"""Why a pod or job has not started, in words (pure, no I/O).

Why a module of its own: a Pending pod is the commonest "nothing happens" on a
shared GPU cluster, and Kubernetes spreads the reason over four places, none
of which KubeSpawner (kubespawner #922) or the training SDKs (Kubeflow sdk
#182) put in front of the user:

- **queued by Kueue**: a Job (PyTorchJob, TrainJob) carrying
  ``kueue.x-k8s.io/queue-name`` is created suspended by Kueue's webhook and
  stays so until its ClusterQueue has quota; a plain pod (a notebook server)
  is held by the ``kueue.x-k8s.io/admission`` scheduling gate instead, and its
  ``PodScheduled`` condition says ``SchedulingGated``;
- **unschedulable**: the scheduler's verdict, the message of its
  ``FailedScheduling`` event, is also the ``PodScheduled=False`` condition's
  message (``0/5 nodes are available: 5 Insufficient nvidia.com/gpu.``), so
  the pod itself says it without reading events;
- **image pull**: a container waiting in ``ErrImagePull``/``ImagePullBackOff``;
- **cannot start** otherwise: another waiting reason with a message
  (``CreateContainerConfigError``: a missing Secret or ConfigMap).

The functions take the API objects as dicts (as the API server returns them)
and return ``""`` when there is nothing to explain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .profiles import KUEUE_QUEUE_LABEL

#: the scheduling gate Kueue's pod integration puts on pods it has not admitted
KUEUE_GATE = "kueue.x-k8s.io/admission"
#: container waiting reasons that are an image problem
IMAGE_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                           "RegistryUnavailable"})
#: waiting reasons that are just a pod starting normally
STARTING_REASONS = frozenset({"ContainerCreating", "PodInitializing"})

Obj = Mapping[str, Any]


def _labels(obj: Obj) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def queue_of(obj: Obj) -> str:
    """The Kueue LocalQueue an object is labelled for, or ``""``."""
    return str(_labels(obj).get(KUEUE_QUEUE_LABEL) or "")


def _queued(queue: str) -> str:
    return (f"queued in Kueue LocalQueue {queue!r}: it waits for admission until the queue's ClusterQueue has "
            f"quota for it (other workloads in that queue are using it now)")


def _condition(pod: Obj, kind: str) -> Mapping[str, Any] | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or () if c.get("type") == kind), None)


def pod_reason(pod: Obj) -> str:
    """Why ``pod`` is not running, or ``""`` (running, finished, or simply starting)."""
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "", "Pending"):
        return ""
    gates = [g.get("name", "") for g in (pod.get("spec") or {}).get("schedulingGates") or ()]
    queue = queue_of(pod)
    if gates:
        if queue or KUEUE_GATE in gates:
            return _queued(queue) if queue else (f"held by Kueue (scheduling gate {KUEUE_GATE}) until it is "
                                                 f"admitted")
        return (f"held by scheduling gate(s) {', '.join(gates)}: a controller of the cluster must remove them "
                f"before the scheduler places the pod")
    scheduled = _condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        reason = scheduled.get("reason") or "Unschedulable"
        message = (scheduled.get("message") or "").strip()
        if reason == "SchedulingGated":
            return _queued(queue) if queue else "held by a scheduling gate"
        return f"cannot be scheduled ({reason}): {message}" if message else f"cannot be scheduled ({reason})"
    for cs in [*(status.get("initContainerStatuses") or ()), *(status.get("containerStatuses") or ())]:
        waiting = (cs.get("state") or {}).get("waiting")
        if not waiting:
            continue
        reason = waiting.get("reason") or ""
        message = (waiting.get("message") or "").strip()
        if reason in IMAGE_REASONS:
            detail = f": {message}" if message else ""
            return f"cannot pull image {cs.get('image', '?')!r} ({reason}){detail}"
        if reason and reason not in STARTING_REASONS:
            return f"container {cs.get('name', '?')!r} cannot start ({reason})" + (f": {message}" if message else "")
    return ""


def is_suspended(job: Obj) -> bool:
    """Whether a Job (``spec.suspend``), PyTorchJob (``spec.runPolicy.suspend``) or TrainJob is suspended."""
    spec = job.get("spec") or {}
    return bool(spec.get("suspend") or (spec.get("runPolicy") or {}).get("suspend"))


def job_reason(job: Obj, pods_by_rank: Mapping[int, Obj], workers: int) -> str:
    """Why a training job's workers are not all running, or ``""``.

    A queued job first (Kueue holds every pod back); then each worker's pod
    reason, ranks that share a reason named together, so 16 workers short of
    GPUs make one line, not sixteen.
    """
    queue = queue_of(job)
    if queue and is_suspended(job):
        text = _queued(queue)
        return f"{text[0].upper()}{text[1:]}."
    groups: dict[str, list[int]] = {}
    for rank in range(workers):
        pod = pods_by_rank.get(rank)
        reason = pod_reason(pod) if pod is not None else ""
        if reason:
            groups.setdefault(reason, []).append(rank)
    if not groups:
        return ""
    parts = []
    for reason, ranks in groups.items():
        who = f"worker {ranks[0]}" if len(ranks) == 1 else f"workers {', '.join(map(str, ranks))}"
        if len(ranks) == workers and workers > 1:
            who = f"all {workers} workers"
        parts.append(f"{who[0].upper()}{who[1:]} {reason}.")
    return "Pending: " + " ".join(parts)


__all__ = ["KUEUE_GATE", "KUEUE_QUEUE_LABEL", "pod_reason", "job_reason", "queue_of", "is_suspended"]
