"""What a user may ask the hub service for, decided without I/O.

Where the objects go: ONE shared namespace (``HubMLService.namespace``) with
label scoping, not a namespace per user. Why: the service then needs a
namespaced Role in one namespace instead of cluster-wide rights to create
namespaces and RBAC (least privilege), and one NetworkPolicy/quota setup per
hub. Isolation comes from (a) every object carrying ``hubml.io/user`` and the
exact user name in the ``hubml.io/username`` annotation, (b) every read,
cancel and delete checking that owner (``require_owner``: 404 when the object
does not exist, 403 when it is someone else's), (c) lists being label-selected
by the caller's slug and then filtered on the exact name, (d) training pods
getting no service-account token and a NetworkPolicy that lets them reach
only their own job, DNS and MLflow. A user can never name a namespace: the
API has no such field.

The functions here turn a validated request (``TrainSpec``/``DeploySpec``),
the caller (name + groups) and the configuration into a ``TrainingPlan`` /
``ServingPlan``, or raise ``InvalidRequest`` (400) / ``Forbidden`` (403) with
a paragraph saying what to change.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from hubml import names, pending
from hubml.errors import Forbidden, InvalidRequest, NotFound
from hubml.jobs import JobState, JobStatus, TrainSpec, WorkerStatus
from hubml.models import DeploySpec
from hubml.pod_resources import pod_resources
from hubml.profiles import Catalogue, Profile, UnknownProfileError

from . import ownership, serving_objects, training_objects


@dataclass(frozen=True)
class Caller:
    """The hub user behind a request, as HubAuth reported them."""

    name: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """The administrator's limits (from the service's traitlets)."""

    namespace: str
    catalogue: Catalogue
    default_image: str
    serving_image: str
    allowed_images: tuple[str, ...] = ()   # anchored regexes; images of the profiles are always allowed
    max_gpus_per_user: int = 8             # GPU units held by running jobs at once
    max_active_jobs_per_user: int = 4
    max_workers: int = 16
    max_deployments_per_user: int = 4
    backoff_limit: int = 0
    ttl_seconds_after_finished: int = 7 * 86400
    python: str = "python"

    def __post_init__(self) -> None:
        for rx in self.allowed_images:
            if not (rx.startswith("^") and rx.endswith("$")):
                raise ValueError(f"allowed_images entry {rx!r} must be anchored with ^ and $.")
            re.compile(rx)


# --------------------------------------------------------------------------- profiles and images


def resolve_profile(policy: Policy, caller: Caller, name: str | None) -> Profile | None:
    """The profile a request runs with: the named one, else the catalogue's default.

    Refuses profiles of groups the caller is not in (403), unknown names (400).
    """
    if name is None:
        profile = policy.catalogue.default
        if profile is not None and not profile.allowed_for(caller.groups):
            allowed = [p for p in policy.catalogue.allowed_for(caller.groups)]
            profile = allowed[0] if allowed else None
        return profile
    try:
        profile = policy.catalogue.get(name)
    except UnknownProfileError as e:
        raise InvalidRequest(f"--profile {name!r}: {e}. List them with GET /profiles or %profiles.") from None
    if not profile.allowed_for(caller.groups):
        raise Forbidden(
            f"Profile {name!r} is reserved for the group(s) {', '.join(profile.groups)}, and {caller.name!r} is in "
            f"none of them. Choose another profile or ask an administrator to add you to one of those groups."
        )
    return profile


def choose_image(policy: Policy, profile: Profile | None, requested: str | None) -> str:
    """The image: the requested one if the profile or the allow-list permits it, else the default.

    Allowed: an image of the profile's choices, one matching the profile's
    ``custom_image`` regex, or one matching ``allowed_images``.
    """
    if requested is None:
        if profile is not None and profile.images:
            default = next((c for c in profile.images if c.default), profile.images[0])
            return default.image
        return policy.default_image
    if not isinstance(requested, str):
        raise InvalidRequest("image must be a string such as 'quay.io/jupyter/pytorch-notebook:2025-01-06'.")
    names.image_reference(requested)
    choices = {c.image for c in profile.images} if profile is not None else set()
    if requested in choices or requested == policy.default_image:
        return requested
    if profile is not None and profile.custom_image and re.match(profile.custom_image.validation_regex, requested):
        return requested
    if any(re.match(rx, requested) for rx in policy.allowed_images):
        return requested
    raise Forbidden(
        f"Image {requested!r} is not on this hub's allow-list. Use the profile's image "
        f"({', '.join(sorted(choices)) or policy.default_image}) or ask an administrator to allow it."
    )


def gpus_for(profile: Profile | None, asked: int) -> int:
    """GPUs (or MIG slices/shares) each worker gets: what was asked, at most what the profile holds.

    ``--gpus-per-worker 0`` with a GPU profile means "the profile's GPUs".
    """
    if profile is None or profile.gpu is None:
        if asked:
            raise InvalidRequest(
                f"--gpus-per-worker {asked} needs a GPU profile, and "
                f"{'profile ' + repr(profile.name) if profile else 'the default profile'} has no GPU. "
                f"Pass --profile with a GPU profile (see %profiles)."
            )
        return 0
    if asked == 0:
        return profile.gpu.count
    if asked > profile.gpu.count:
        raise InvalidRequest(
            f"--gpus-per-worker {asked} is more than profile {profile.name!r} gives one worker "
            f"({profile.gpu.count}). Lower --gpus-per-worker or choose a larger profile; use --workers to add GPUs."
        )
    return asked


def gpu_units(profile: Profile | None, gpus: int, workers: int) -> int:
    """GPU units a job holds against the per-user quota (a time-sliced share counts 1)."""
    if profile is None or profile.gpu is None or not gpus:
        return 0
    per_worker = 1 if profile.gpu.shared else gpus
    return per_worker * workers


def check_quota(policy: Policy, caller: Caller, workers: int, units: int, active: list[JobStatus]) -> None:
    """Refuse a job that would pass the per-user limits (403, naming the jobs holding them)."""
    if workers > policy.max_workers:
        raise Forbidden(
            f"--workers {workers} is more than this hub allows per job ({policy.max_workers}). "
            f"Use fewer workers or more GPUs per worker."
        )
    running = [j for j in active if not j.state.finished]
    if len(running) >= policy.max_active_jobs_per_user:
        raise Forbidden(
            f"You already have {len(running)} unfinished job(s) ({', '.join(j.id for j in running)}); the limit is "
            f"{policy.max_active_jobs_per_user}. Wait for one to finish or cancel it with %train_cancel."
        )
    held = sum(int(j.gpus_per_worker or 0) * j.workers for j in running)
    if held + units > policy.max_gpus_per_user:
        raise Forbidden(
            f"This job needs {units} GPU(s) and your running jobs hold {held}; the limit per user is "
            f"{policy.max_gpus_per_user}. Cancel a job, or ask for fewer workers or GPUs."
        )


# --------------------------------------------------------------------------- admission
#
# Admission makes every refusal a request can get (400/403), with no I/O and
# before anything exists; assembly turns what was admitted into a plan and has
# nothing left to refuse. The services admit, then create what the plan needs
# from outside (the MLflow run, the model version), then assemble once.


@dataclass(frozen=True)
class AdmittedTraining:
    """A ``%%train`` request that passed every check, with what policy chose for it."""

    spec: TrainSpec
    profile: Profile | None
    gpus: int
    image: str


#: The variables the service adds to every worker (values known only once the run exists).
SYSTEM_ENV_NAMES = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "HUBML_JOB_ID")


def admit_training(policy: Policy, caller: Caller, spec: TrainSpec, *, image: str | None = None,
                   active: list[JobStatus] = (), trainjob: bool = False) -> AdmittedTraining:
    """Every refusal of a ``%%train`` request: spec, profile and groups, GPUs, quota, image, flavour."""
    spec.validate()
    profile = resolve_profile(policy, caller, spec.profile)
    gpus = gpus_for(profile, spec.gpus_per_worker)
    check_quota(policy, caller, spec.workers, gpu_units(profile, gpus, spec.workers), list(active))
    admitted = AdmittedTraining(spec=spec, profile=profile, gpus=gpus, image=choose_image(policy, profile, image))
    if trainjob:  # what a Kubeflow TrainJob cannot express
        training_objects.trainjob_node_selector(profile.node_selector() if profile else {},
                                       profile.node_affinity() if profile else [])
        training_objects.trainjob_env_check(spec.env, (*SYSTEM_ENV_NAMES, *pod_resources(profile, gpus).env))
    return admitted


def assemble_training(policy: Policy, caller: Caller, admitted: AdmittedTraining, *, job_id: str,
                      mlflow_env: dict[str, str], record: dict[str, Any],
                      extra_pod_annotations: dict[str, str] | None = None) -> training_objects.TrainingPlan:
    """The plan of an admitted job's Kubernetes objects, once its MLflow run exists."""
    spec, profile, gpus = admitted.spec, admitted.profile, admitted.gpus
    record = {**record, "gpus_per_worker": gpus, "profile": profile.name if profile else None}
    annotations = dict(profile.pod_annotations()) if profile else {}
    annotations.update(extra_pod_annotations or {})
    resources = pod_resources(profile, gpus)
    plan = training_objects.TrainingPlan(
        job_id=job_id, namespace=policy.namespace, username=caller.name, image=admitted.image, code=spec.code,
        workers=spec.workers, nproc_per_node=max(gpus, 1) if not (profile and profile.gpu and profile.gpu.shared) else 1,
        resources=resources.kubernetes(),
        node_selector=profile.node_selector() if profile else {},
        node_affinity=profile.node_affinity() if profile else [],
        tolerations=profile.tolerations() if profile else [],
        env=dict(spec.env), system_env={**resources.env, **mlflow_env, "HUBML_JOB_ID": job_id},
        pod_labels=profile.pod_labels() if profile else {},
        pod_annotations=annotations,
        record=record, backoff_limit=policy.backoff_limit,
        ttl_seconds_after_finished=policy.ttl_seconds_after_finished,
        active_deadline_seconds=int(spec.timeout) if spec.timeout else None,
        python=policy.python,
    )
    return plan.validate()  # an invariant by now: every field was admitted or comes from configuration


def plan_training(policy: Policy, caller: Caller, spec: TrainSpec, *, job_id: str,
                  mlflow_env: dict[str, str], record: dict[str, Any], image: str | None = None,
                  active: list[JobStatus] = (), extra_pod_annotations: dict[str, str] | None = None
                  ) -> training_objects.TrainingPlan:
    """Admission and assembly in one step, for callers that have the run already (tests, benchmarks)."""
    admitted = admit_training(policy, caller, spec, image=image, active=active)
    return assemble_training(policy, caller, admitted, job_id=job_id, mlflow_env=mlflow_env, record=record,
                             extra_pod_annotations=extra_pod_annotations)


#: KServe derives "<name>-predictor-..." object and host names; keep room for them.
MAX_KSERVE_NAME = 45


@dataclass(frozen=True)
class AdmittedServing:
    """A ``%deploy`` request that passed every check, with its profile."""

    spec: DeploySpec
    profile: Profile | None
    kserve: bool


def admit_serving(policy: Policy, caller: Caller, spec: DeploySpec, *, kserve: bool,
                  existing: list[str] = ()) -> AdmittedServing:
    """Every refusal of a ``%deploy`` request that needs no registry: name, canary, quota, profile."""
    spec.validate()
    if kserve and len(spec.name) > MAX_KSERVE_NAME:
        raise InvalidRequest(
            f"Deployment name {spec.name!r} is {len(spec.name)} characters; KServe adds suffixes to it, so use at "
            f"most {MAX_KSERVE_NAME}."
        )
    if spec.canary_percent is not None and not kserve:
        raise InvalidRequest(
            "--canary needs KServe (the InferenceService CRD), which this cluster does not have; deploy without "
            "--canary, or ask an administrator to install KServe."
        )
    if spec.canary_percent is not None and spec.name not in existing:
        raise InvalidRequest(
            f"--canary sends a share of an existing deployment's traffic to a new version, and you have no "
            f"deployment {spec.name!r}: deploy the first version without --canary, then the next with "
            f"--name {spec.name} --canary PERCENT."
        )
    if spec.name not in existing and len(existing) >= policy.max_deployments_per_user:
        raise Forbidden(
            f"You already have {len(existing)} deployment(s) ({', '.join(existing)}); the limit is "
            f"{policy.max_deployments_per_user}. Remove one with %undeploy first."
        )
    return AdmittedServing(spec=spec, profile=resolve_profile(policy, caller, spec.profile), kserve=kserve)


def assemble_serving(policy: Policy, caller: Caller, admitted: AdmittedServing, *, version: int,
                     storage_uri: str, env: dict[str, str], runtime: str = "",
                     deployment_mode: str = "Standard") -> serving_objects.ServingPlan:
    """The plan of an admitted deployment, once the registry resolved the model version."""
    spec, profile = admitted.spec, admitted.profile
    resources = pod_resources(profile)
    plan = serving_objects.ServingPlan(
        name=spec.name, namespace=policy.namespace, username=caller.name, model=str(spec.model),
        model_name=spec.model.name, version=version, storage_uri=storage_uri, image=policy.serving_image,
        min_replicas=spec.min_replicas, max_replicas=max(spec.max_replicas, 1), canary_percent=spec.canary_percent,
        resources=resources.kubernetes(),
        node_selector=profile.node_selector() if profile else {},
        node_affinity=profile.node_affinity() if profile else [],
        tolerations=profile.tolerations() if profile else [],
        pod_labels=profile.pod_labels() if profile else {}, env={**resources.env, **env}, created=time.time(),
        runtime=runtime, deployment_mode=deployment_mode,
    )
    return plan.validate()  # storage_uri comes from the registry: still checked before it reaches a pod


def plan_serving(policy: Policy, caller: Caller, spec: DeploySpec, *, version: int, storage_uri: str,
                 kserve: bool, env: dict[str, str], existing: list[str] = ()) -> serving_objects.ServingPlan:
    """Admission and assembly in one step, for callers that resolved the model already (tests)."""
    admitted = admit_serving(policy, caller, spec, kserve=kserve, existing=existing)
    return assemble_serving(policy, caller, admitted, version=version, storage_uri=storage_uri, env=env)


# --------------------------------------------------------------------------- ownership


def require_owner(obj: dict[str, Any] | None, caller: Caller, what: str, name: str) -> dict[str, Any]:
    """404 when absent or not made by hubml, 403 when it is another user's."""
    if obj is None:
        raise NotFound(f"{what} {name!r} does not exist (it may have been removed after it finished).")
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if labels.get(ownership.LABEL_MANAGED_BY) != ownership.MANAGED_BY:
        raise NotFound(f"{what} {name!r} does not exist.")
    if not ownership.owned_by(obj, caller.name):
        raise Forbidden(f"{what} {name!r} belongs to another user; you can only see and change your own.")
    return obj


# --------------------------------------------------------------------------- status


spec_record = ownership.spec_record


def _ts(value: str | None) -> float | None:
    if not value:
        return None
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _pod_state(pod: dict[str, Any]) -> tuple[JobState, int | None]:
    status = pod.get("status") or {}
    phase = status.get("phase")
    exit_code = None
    for cs in status.get("containerStatuses") or ():
        term = (cs.get("state") or {}).get("terminated")
        if term is not None:
            exit_code = term.get("exitCode")
    if phase == "Succeeded":
        return JobState.SUCCEEDED, exit_code if exit_code is not None else 0
    if phase == "Failed":
        return JobState.FAILED, exit_code if exit_code is not None else 1
    if phase == "Running":
        return JobState.RUNNING, None
    return JobState.PENDING, None


def pod_rank(pod: dict[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    for source in (meta.get("labels") or {}, meta.get("annotations") or {}):
        value = source.get(ownership.COMPLETION_INDEX_LABEL)
        if value is not None and str(value).isdigit():
            return int(value)
    labels = meta.get("labels") or {}
    if labels.get("training.kubeflow.org/replica-index", "").isdigit():
        offset = 0 if labels.get("training.kubeflow.org/replica-type", "").lower() == "master" else 1
        return int(labels["training.kubeflow.org/replica-index"]) + offset
    return None


def trainjob_running(job: dict[str, Any]) -> bool:
    """Whether a TrainJob's trainer (``node``) job has all its pods ready, from ``status.jobsStatus``.

    The Trainer counts child Jobs there: ``ready`` is the number of Jobs of
    the replicated job whose pods are all ready or done, so ``ready >= 1`` on
    ``node`` (one Job of ``numNodes`` pods) means every worker runs.
    """
    for entry in (job.get("status") or {}).get("jobsStatus") or ():
        if entry.get("name") == training_objects.TRAINER_NODE:
            return int(entry.get("ready") or 0) + int(entry.get("succeeded") or 0) >= 1
    return False


def pods_by_rank(pods: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each rank's newest pod (a replacement after a failure wins over the pod it replaced)."""
    by_rank: dict[int, dict[str, Any]] = {}
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or ""):
        rank = pod_rank(pod)
        if rank is not None:
            by_rank[rank] = pod
    return by_rank


def failed_pods(pods: list[dict[str, Any]]) -> dict[int, str]:
    """rank -> name of the rank's pod, for the ranks whose newest pod failed."""
    return {rank: (pod.get("metadata") or {}).get("name", "") for rank, pod in pods_by_rank(pods).items()
            if _pod_state(pod)[0] is JobState.FAILED}


#: exit codes of a container stopped from outside (SIGTERM, SIGKILL: the Job controller
#: deleting the other pods once one failed, the OOM killer): a consequence, not a cause
_STOPPED_CODES = frozenset({128 + 15, 128 + 9})


def _finished_ns(pod: dict[str, Any]) -> int | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        at = _ts(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt"))
        if at is not None:
            return int(at * 1e9)
    return None


def job_status(job: dict[str, Any], pods: list[dict[str, Any]],
               failed_at: dict[int, int] | None = None) -> JobStatus:
    """A ``JobStatus`` from a Job (PyTorchJob, TrainJob) and its pods, as the API server reports them.

    The newest pod per rank wins (a replacement pod after a failure). A worker
    that ended non-zero makes the job failed, naming the rank and exit code;
    the Job's own ``Failed`` condition (deadline, backoff) explains the rest.

    When several ranks failed, the one named is the cause: not one stopped from
    outside, then the one that failed first. One rank's crash makes its peers'
    next collective fail within a second ("Connection closed by peer"), and a
    container's ``finishedAt`` has whole seconds, so ``failed_at`` (rank -> ns,
    the caller's reading of each failed pod's last log line, which the kubelet
    stamps in nanoseconds) orders them when given; the lowest rank breaks ties.
    """
    meta = job.get("metadata") or {}
    rec = spec_record(job)
    workers = int(rec.get("workers") or 1)
    annotations = meta.get("annotations") or {}
    by_rank = pods_by_rank(pods)
    worker_states = []
    for rank in range(workers):
        pod = by_rank.get(rank)
        state, code = _pod_state(pod) if pod else (JobState.PENDING, None)
        worker_states.append(WorkerStatus(rank=rank, state=state, exit_code=code))
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or ()
                  if c.get("status") == "True"}
    status = job.get("status") or {}
    trainjob = job.get("kind") == "TrainJob"
    if trainjob and not by_rank:
        # no pod seen (yet): the Trainer's jobsStatus says whether the node job runs
        running = trainjob_running(job)
        worker_states = [WorkerStatus(rank=w.rank, state=JobState.RUNNING if running else JobState.PENDING)
                         for w in worker_states]
    failed = [w for w in worker_states if w.state is JobState.FAILED]
    message = ""
    if annotations.get(ownership.ANNOTATION_CANCELLED):
        state = JobState.CANCELLED
        message = "Cancelled by the user."
    elif "Complete" in conditions or "Succeeded" in conditions:
        state = JobState.SUCCEEDED
    elif "Failed" in conditions or failed:
        state = JobState.FAILED
        cond = conditions.get("Failed") or {}
        message = cond.get("message") or cond.get("reason") or ""
    elif trainjob and "Suspended" in conditions and not pending.queue_of(job):
        state = JobState.PENDING
        cond = conditions["Suspended"]
        message = f"Suspended: {cond.get('message') or cond.get('reason') or 'the TrainJob is suspended'}"
    elif worker_states and all(w.state in (JobState.RUNNING, JobState.SUCCEEDED) for w in worker_states):
        state = JobState.RUNNING
    else:
        state = JobState.PENDING
        message = pending.job_reason(job, by_rank, workers)
    failed_at = failed_at or {}

    def cause_order(w: WorkerStatus) -> tuple[bool, float, int]:
        at = failed_at.get(w.rank) or _finished_ns(by_rank[w.rank])
        return w.exit_code in _STOPPED_CODES, at if at is not None else float("inf"), w.rank

    first_failed = min(failed, key=cause_order) if failed else None
    if state is JobState.FAILED and first_failed is not None:
        message = (f"Worker {first_failed.rank} exited with code {first_failed.exit_code}. " + message).strip()
    created = _ts(meta.get("creationTimestamp")) or float(rec.get("created") or 0)
    finished_at = None
    if state.finished:
        finished_at = _ts(status.get("completionTime")) or _ts((conditions.get("Failed") or {}).get(
            "lastTransitionTime")) or _ts((conditions.get("Complete") or {}).get("lastTransitionTime")) or _ts(annotations.get(ownership.ANNOTATION_CANCELLED) if
                                          annotations.get(ownership.ANNOTATION_CANCELLED, "").endswith("Z") else None)
    started = _ts(status.get("startTime"))
    return JobStatus(
        id=meta.get("name", ""), state=state, workers=workers, backend="hub", created=created,
        started=started, finished=finished_at, run_id=rec.get("run_id"), experiment_id=rec.get("experiment_id"),
        experiment=rec.get("experiment"), run_name=rec.get("run_name"), profile=rec.get("profile"),
        gpus_per_worker=int(rec.get("gpus_per_worker") or 0),
        failed_rank=first_failed.rank if state is JobState.FAILED and first_failed else None,
        exit_code=first_failed.exit_code if state is JobState.FAILED and first_failed else None,
        message=message, worker_states=worker_states,
    )
