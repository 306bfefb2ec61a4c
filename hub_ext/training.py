"""Training jobs on Kubernetes: submit, list, read, cancel, logs (the I/O around ``policy``/``objects``).

Order of creation, so that nothing is half-made and no pod starts early:
the ConfigMap (code), NetworkPolicy and headless Service (rendezvous) first,
then the Job, then an ownerReference from each of them to the Job (so the
garbage collector removes them with it). Any failure deletes what was made
and marks the MLflow run FAILED. (Creating the Job suspended and resuming it
costs an extra Job-controller round trip, about a second, on every submit.)

Cancel sets ``activeDeadlineSeconds: 1`` and the ``hubml.io/cancelled``
annotation: the Job controller terminates the pods and marks the Job failed
(DeadlineExceeded), which makes it *finished*, so ``ttlSecondsAfterFinished``
later deletes it and everything it owns. The annotation makes it read as
"cancelled", not "failed".
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from hubml import names
from hubml.errors import InvalidRequest, NotFound
from hubml.jobs import JobState, JobStatus, LogLine, TrainSpec

from . import kube as k
from . import objects, policy as pol
from .mlflow_registry import MlflowRegistry

_CURSOR_RE = re.compile(r"^(\d{1,3}:\d{1,9}(,\d{1,3}:\d{1,9})*)?$")
MAX_LOG_BYTES = 4 * 1024 * 1024


def parse_cursor(cursor: str | None) -> dict[int, int]:
    """``"0:12,1:5"`` (lines already read per rank) -> ``{0: 12, 1: 5}``."""
    if cursor in (None, ""):
        return {}
    if not isinstance(cursor, str) or not _CURSOR_RE.match(cursor):
        raise InvalidRequest(
            f"cursor {cursor!r} is not a log cursor; pass back the next_cursor of the previous answer, or "
            f"leave it out to read from the start."
        )
    return {int(r): int(n) for r, n in (part.split(":") for part in cursor.split(","))}


def format_cursor(seen: dict[int, int]) -> str:
    return ",".join(f"{r}:{n}" for r, n in sorted(seen.items()))


@dataclass
class CrdCache:
    """Which operators the cluster has, re-checked at most every ``ttl`` seconds."""

    kube: k.Kube
    ttl: float = 30.0
    _at: float = 0.0
    _found: dict[str, bool] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self) -> dict[str, bool]:
        if time.monotonic() - self._at > self.ttl or not self._found:
            async with self._lock:
                if time.monotonic() - self._at > self.ttl or not self._found:
                    self._found = await k.detect_crds(self.kube)
                    self._at = time.monotonic()
        return self._found

    async def use_operator(self, flavour: str, operator: str, kind: str) -> bool:
        """Whether to create the operator's object (``kind``) rather than hubml's built-in one.

        ``flavour`` is the configured choice: ``"auto"`` follows the CRD's presence,
        ``operator`` forces it, anything else (the built-in flavour) refuses it.
        """
        if flavour == "auto":
            return (await self.get()).get(kind, False)
        return flavour == operator


class JobReflector:
    """Local, watch-updated copies of hubml's training Jobs and their Pods (KubeSpawner's reflector).

    Why: a notebook polls its job about once a second and lists jobs on every
    ``%jobs``; answering those from memory keeps the API server out of the hot
    path, as KubeSpawner does for pods. Reads of an object not yet seen by the
    watch fall back to a direct GET (read-your-writes after a submit).
    """

    def __init__(self, namespace: str) -> None:
        from kubespawner.reflector import NamespacedResourceReflector

        labels = {objects.LABEL_MANAGED_BY: objects.MANAGED_BY, objects.LABEL_KIND: objects.KIND_TRAINING}
        self.jobs = NamespacedResourceReflector(kind="jobs", namespace=namespace, labels=labels,
                                                api_group_name="BatchV1Api", list_method_name="list_namespaced_job")
        self.pods = NamespacedResourceReflector(kind="pods", namespace=namespace, labels=labels)

    async def start(self) -> None:
        await asyncio.gather(self.jobs.start(), self.pods.start())

    async def stop(self) -> None:
        await asyncio.gather(self.jobs.stop(), self.pods.stop())


class Training:
    """The jobs half of the service; one instance per service process."""

    def __init__(self, kube: k.Kube, registry: MlflowRegistry, policy: pol.Policy, crds: CrdCache, *,
                 flavour: str = "auto", mlflow_pod_uri: str, mlflow_egress: list[objects.EgressRule],
                 extra_pod_annotations: dict[str, str] | None = None) -> None:
        self.kube = kube
        self.registry = registry
        self.policy = policy
        self.crds = crds
        self.flavour = flavour
        self.mlflow_pod_uri = mlflow_pod_uri
        self.mlflow_egress = mlflow_egress
        self.extra_pod_annotations = dict(extra_pod_annotations or {})
        self.cache: JobReflector | None = None

    def use_cache(self, cache: JobReflector) -> None:
        self.cache = cache

    @property
    def ns(self) -> str:
        return self.policy.namespace

    async def _use_pytorchjob(self) -> bool:
        return await self.crds.use_operator(self.flavour, "pytorchjob", "PyTorchJob")

    # ------------------------------------------------------------------ submit

    async def submit(self, caller: pol.Caller, body: dict[str, Any]) -> JobStatus:
        body = dict(body)
        image = body.pop("image", None)
        spec = TrainSpec.from_dict(body).validate()
        job_id = f"train-{secrets.token_hex(5)}"
        active = [j for j in await self.list(caller) if not j.state.finished]
        record = {"workers": spec.workers, "experiment": spec.experiment, "run_name": spec.run_name,
                  "created": time.time()}
        # refuse bad requests before anything exists (the run included)
        pol.plan_training(self.policy, caller, spec, job_id=job_id, mlflow_env={}, record=record, image=image,
                          active=active)
        run = await asyncio.to_thread(self.registry.create_run, caller.name, job_id, spec.experiment, spec.run_name)
        record.update(run)
        env = {"MLFLOW_TRACKING_URI": self.mlflow_pod_uri, "MLFLOW_RUN_ID": run["run_id"],
               "MLFLOW_EXPERIMENT_ID": str(run["experiment_id"])}
        plan = pol.plan_training(self.policy, caller, spec, job_id=job_id, mlflow_env=env, record=record,
                                 image=image, active=active, extra_pod_annotations=self.extra_pod_annotations)
        use_pj = await self._use_pytorchjob()
        res = k.PYTORCH_JOB if use_pj else k.JOB
        manifest = objects.pytorch_job(plan) if use_pj else objects.indexed_job(plan)
        deps = [objects.code_config_map(plan), objects.training_network_policy(plan, self.mlflow_egress)]
        if not use_pj:
            deps.append(objects.rendezvous_service(plan))
        made: list[dict[str, Any]] = []
        created = None
        try:
            # code, network rules and rendezvous name exist before any pod can start ...
            for result in await asyncio.gather(*(self.kube.create(d) for d in deps), return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
                made.append(result)
            created = await self.kube.create(manifest)
            # ... and belong to the job, so that TTL or a delete of the job removes them
            owner = {"metadata": {"ownerReferences": [objects.owner_reference(created)]}}
            await asyncio.gather(*(self.kube.patch(k.resource_of(d), self.ns, d["metadata"]["name"], owner)
                                   for d in made))
        except BaseException:
            if created is not None:
                await self.kube.delete(res, self.ns, job_id, propagation="Background")
            for d in made:
                try:
                    await self.kube.delete(k.resource_of(d), self.ns, d["metadata"]["name"])
                except k.KubeError:
                    pass
            await asyncio.to_thread(self.registry.end_run, run["run_id"], "FAILED")
            raise
        return pol.job_status(created, [])

    # ------------------------------------------------------------------ read

    async def _find(self, caller: pol.Caller, job_id: str) -> tuple[k.Resource, dict[str, Any]]:
        try:
            names.dns_label(job_id, "Job id")
        except InvalidRequest:
            raise NotFound(f"Job {job_id!r} does not exist.") from None
        job = self.cache.jobs.resources.get(f"{self.ns}/{job_id}") if self.cache else None
        if job is None:
            job = await self.kube.get_or_none(k.JOB, self.ns, job_id)
        res = k.JOB
        if job is None and (await self.crds.get()).get("PyTorchJob"):
            job = await self.kube.get_or_none(k.PYTORCH_JOB, self.ns, job_id)
            res = k.PYTORCH_JOB
        pol.require_owner(job, caller, "Job", job_id)
        return res, job

    async def _pods(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        if self.cache is not None:
            return [p for p in self.cache.pods.resources.values()
                    if all(((p.get("metadata") or {}).get("labels") or {}).get(key) == value
                           for key, value in labels.items())]
        return await self.kube.list(k.POD, self.ns, labels=labels)

    async def get(self, caller: pol.Caller, job_id: str) -> JobStatus:
        _res, job = await self._find(caller, job_id)
        pods = await self._pods({objects.LABEL_JOB: job_id, objects.LABEL_KIND: objects.KIND_TRAINING})
        return pol.job_status(job, pods)

    async def list(self, caller: pol.Caller) -> list[JobStatus]:
        labels = {objects.LABEL_USER: objects.user_slug(caller.name), objects.LABEL_KIND: objects.KIND_TRAINING}
        kinds = [] if self.cache is not None else [k.JOB]
        if self.flavour != "job" and (await self.crds.get()).get("PyTorchJob"):
            kinds.append(k.PYTORCH_JOB)
        results = list(await asyncio.gather(*(self.kube.list(r, self.ns, labels=labels) for r in kinds),
                                            self._pods(labels)))
        if self.cache is not None:
            slug = labels[objects.LABEL_USER]
            results.insert(0, [j for j in self.cache.jobs.resources.values()
                               if ((j.get("metadata") or {}).get("labels") or {}).get(objects.LABEL_USER) == slug])
        jobs = [j for items in results[:-1] for j in items if objects.owned_by(j, caller.name)]
        by_job: dict[str, list[dict[str, Any]]] = {}
        for pod in results[-1]:
            by_job.setdefault(((pod.get("metadata") or {}).get("labels") or {}).get(objects.LABEL_JOB, ""),
                              []).append(pod)
        statuses = [pol.job_status(j, by_job.get(j["metadata"]["name"], [])) for j in jobs]
        return sorted(statuses, key=lambda s: s.created, reverse=True)

    # ------------------------------------------------------------------ cancel

    async def cancel(self, caller: pol.Caller, job_id: str) -> JobStatus:
        res, job = await self._find(caller, job_id)
        status = await self.get(caller, job_id)
        if status.state.finished:
            return status
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch: dict[str, Any] = {"metadata": {"annotations": {objects.ANNOTATION_CANCELLED: now}}}
        if res is k.JOB:
            patch["spec"] = {"activeDeadlineSeconds": 1, "suspend": False}
        else:
            patch["spec"] = {"runPolicy": {"activeDeadlineSeconds": 1, "suspend": False}}
        await self.kube.patch(res, self.ns, job_id, patch)
        if status.run_id:
            await asyncio.to_thread(self.registry.end_run, status.run_id, "KILLED")
        return await self.get(caller, job_id)

    # ------------------------------------------------------------------ logs

    async def _read_logs(self, job_id: str, seen: dict[int, int]) -> tuple[list[LogLine], dict[int, int]]:
        pods = await self._pods({objects.LABEL_JOB: job_id, objects.LABEL_KIND: objects.KIND_TRAINING})
        by_rank: dict[int, dict[str, Any]] = {}
        for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
            rank = pol.pod_rank(pod)
            phase = (pod.get("status") or {}).get("phase")
            if rank is not None and phase in ("Running", "Succeeded", "Failed"):
                by_rank[rank] = pod

        async def one(rank: int, pod: dict[str, Any]) -> tuple[int, list[str]]:
            try:
                text = await self.kube.pod_log(self.ns, pod["metadata"]["name"], limit_bytes=MAX_LOG_BYTES)
            except k.KubeError:
                return rank, []  # not started yet, or the node serves no logs
            return rank, (text or "").splitlines()

        lines: list[LogLine] = []
        seen = dict(seen)
        for rank, all_lines in await asyncio.gather(*(one(r, p) for r, p in by_rank.items())):
            start = seen.get(rank, 0)
            lines += [LogLine(rank, t) for t in all_lines[start:]]
            seen[rank] = max(start, len(all_lines))
        return lines, seen

    async def logs(self, caller: pol.Caller, job_id: str, cursor: str | None,
                   wait: float = 0.0) -> tuple[list[LogLine], str, JobState]:
        """Lines since ``cursor``; with ``wait`` > 0, long-poll until a line arrives or the job ends."""
        seen = parse_cursor(cursor)
        await self._find(caller, job_id)
        deadline = time.monotonic() + max(0.0, min(wait, 30.0))
        while True:
            lines, seen_now = await self._read_logs(job_id, seen)
            status = await self.get(caller, job_id)
            if lines or status.state.finished or time.monotonic() >= deadline:
                return lines, format_cursor(seen_now), status.state
            await asyncio.sleep(0.5)
