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
"cancelled", not "failed". A Trainer ``TrainJob`` (whose deadline is
immutable) is suspended instead, so the Trainer removes its pods, and its
ConfigMap is deleted; finished TrainJobs are deleted by ``list`` once
``ttlSecondsAfterFinished`` has passed, since the Trainer keeps them forever.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from hubml import names, pending
from hubml.errors import InvalidRequest, NotFound
from hubml.jobs import JobState, JobStatus, LogLine, TrainSpec

from . import kube as k
from . import log_cursor as lc
from . import canary, ownership, training_objects, policy as pol
from hubml.registry import Registry

@dataclass
class CrdCache:
    """Which operators the cluster has, re-checked at most every ``ttl`` seconds."""

    kube: k.Kube
    ttl: float = 30.0
    _at: float = 0.0
    _found: dict[str, bool] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _isvc_schema_url: str = ""
    _isvc_canary: bool = False

    async def get(self) -> dict[str, bool]:
        if time.monotonic() - self._at > self.ttl or not self._found:
            async with self._lock:
                if time.monotonic() - self._at > self.ttl or not self._found:
                    self._found = await k.detect_crds(self.kube)
                    self._at = time.monotonic()
        return self._found

    async def kserve_canary(self) -> bool:
        """Whether the cluster's InferenceService CRD has Standard-mode named canaries (``spec.canary[]``,
        KServe >= 0.20), read from the schema the API server publishes, never guessed from a version."""
        if not (await self.get()).get("InferenceService"):
            return False
        async with self._lock:
            url, schema = await self.kube.openapi_schema(k.INFERENCE_SERVICE, self._isvc_schema_url)
            if schema is not None:
                self._isvc_schema_url, self._isvc_canary = url, canary.schema_has_canary(schema)
        return self._isvc_canary

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

        labels = {ownership.LABEL_MANAGED_BY: ownership.MANAGED_BY, ownership.LABEL_KIND: ownership.KIND_TRAINING}
        self.jobs = NamespacedResourceReflector(kind="jobs", namespace=namespace, labels=labels,
                                                api_group_name="BatchV1Api", list_method_name="list_namespaced_job")
        self.pods = NamespacedResourceReflector(kind="pods", namespace=namespace, labels=labels)

    async def start(self) -> None:
        await asyncio.gather(self.jobs.start(), self.pods.start())

    async def stop(self) -> None:
        await asyncio.gather(self.jobs.stop(), self.pods.stop())


class Training:
    """The jobs half of the service; one instance per service process."""

    def __init__(self, kube: k.Kube, registry: Registry, policy: pol.Policy, crds: CrdCache, *,
                 flavour: str = "auto", mlflow_pod_uri: str, mlflow_egress: list[training_objects.EgressRule],
                 extra_pod_annotations: dict[str, str] | None = None,
                 trainer_runtime: training_objects.TrainerRuntime = training_objects.TrainerRuntime()) -> None:
        self.kube = kube
        self.registry = registry
        self.policy = policy
        self.crds = crds
        self.flavour = flavour
        self.mlflow_pod_uri = mlflow_pod_uri
        self.mlflow_egress = mlflow_egress
        self.extra_pod_annotations = dict(extra_pod_annotations or {})
        self.trainer_runtime = trainer_runtime.validate()
        self.cache: JobReflector | None = None
        #: ids of jobs found to be TrainJobs: their pods carry their JobSet's labels, not hubml's (``_pods``)
        self._trainjob_ids: set[str] = set()

    def use_cache(self, cache: JobReflector) -> None:
        self.cache = cache

    @property
    def ns(self) -> str:
        return self.policy.namespace

    async def resolved_flavour(self) -> str:
        """The flavour new jobs get: the configured one, or for ``auto`` the installed operator
        (``PyTorchJob``, then Trainer ``TrainJob``), else hubml's built-in Indexed Job."""
        if self.flavour != "auto":
            return self.flavour
        found = await self.crds.get()
        return "pytorchjob" if found.get("PyTorchJob") else "trainjob" if found.get("TrainJob") else "job"

    # ------------------------------------------------------------------ submit

    async def submit(self, caller: pol.Caller, body: dict[str, Any]) -> JobStatus:
        body = dict(body)
        image = body.pop("image", None)
        spec = TrainSpec.from_dict(body).validate()
        job_id = f"train-{secrets.token_hex(5)}"
        active = [j for j in await self.list(caller) if not j.state.finished]
        record = {"workers": spec.workers, "experiment": spec.experiment, "run_name": spec.run_name,
                  "created": time.time()}
        flavour = await self.resolved_flavour()
        # every refusal before anything exists (the run included); the plan is assembled once, below
        admitted = pol.admit_training(self.policy, caller, spec, image=image, active=active,
                                      trainjob=flavour == "trainjob")
        run = await asyncio.to_thread(self.registry.create_run, caller.name, job_id, spec.experiment, spec.run_name)
        record.update(run)
        env = {"MLFLOW_TRACKING_URI": self.mlflow_pod_uri, "MLFLOW_RUN_ID": run["run_id"],
               "MLFLOW_EXPERIMENT_ID": str(run["experiment_id"])}
        res = {"pytorchjob": k.PYTORCH_JOB, "trainjob": k.TRAIN_JOB}.get(flavour, k.JOB)
        try:  # assembly refuses nothing; a bug here must still not leave the run open
            plan = pol.assemble_training(self.policy, caller, admitted, job_id=job_id, mlflow_env=env,
                                         record=record, extra_pod_annotations=self.extra_pod_annotations)
            if flavour == "trainjob":
                manifest = training_objects.train_job(plan, self.trainer_runtime)
                selector = training_objects.trainjob_pod_selector(job_id)
            else:
                manifest = training_objects.pytorch_job(plan) if flavour == "pytorchjob" else training_objects.indexed_job(plan)
                selector = None
            deps = [training_objects.code_config_map(plan),
                    training_objects.training_network_policy(plan, self.mlflow_egress, pod_selector=selector)]
            if flavour == "job":
                deps.append(training_objects.rendezvous_service(plan))
        except BaseException:
            await asyncio.to_thread(self.registry.end_run, run["run_id"], "FAILED")
            raise
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
            owner = {"metadata": {"ownerReferences": [ownership.owner_reference(created)]}}
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
        for operator in (k.PYTORCH_JOB, k.TRAIN_JOB):
            if job is None and (await self.crds.get()).get(operator.kind):
                job = await self.kube.get_or_none(operator, self.ns, job_id)
                res = operator
        pol.require_owner(job, caller, "Job", job_id)
        if res is k.TRAIN_JOB:
            self._trainjob_ids.add(job_id)
        return res, job

    async def _pods(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        job_id = labels.get(ownership.LABEL_JOB)
        if job_id in self._trainjob_ids:  # (``_find`` saw it) the JobSet's pods: not in the reflector
            return await self.kube.list(k.POD, self.ns, labels=training_objects.trainjob_pod_selector(job_id))
        if self.cache is not None:
            return [p for p in self.cache.pods.resources.values()
                    if all(((p.get("metadata") or {}).get("labels") or {}).get(key) == value
                           for key, value in labels.items())]
        return await self.kube.list(k.POD, self.ns, labels=labels)

    async def get(self, caller: pol.Caller, job_id: str) -> JobStatus:
        _res, job = await self._find(caller, job_id)
        pods = await self._pods({ownership.LABEL_JOB: job_id, ownership.LABEL_KIND: ownership.KIND_TRAINING})
        failed = pol.failed_pods(pods)
        return pol.job_status(job, pods, await self._failure_times(failed) if len(failed) > 1 else None)

    async def _failure_times(self, failed: dict[int, str]) -> dict[int, int]:
        """rank -> when its failed pod wrote its last log line (ns): which rank failed first,
        when several did within the second ``finishedAt`` resolves (see ``job_status``)."""
        async def last_line(rank: int, pod: str) -> tuple[int, int | None]:
            try:
                raw = await self.kube.pod_log(self.ns, pod, tail_lines=1, timestamps=True)
            except k.KubeError:
                return rank, None  # gone, or the node serves no logs: finishedAt decides
            return rank, lc.parse_timestamp(raw.decode("utf-8", "replace").partition(" ")[0])

        found = await asyncio.gather(*(last_line(rank, pod) for rank, pod in failed.items()))
        return {rank: at for rank, at in found if at is not None}

    async def list(self, caller: pol.Caller) -> list[JobStatus]:
        labels = {ownership.LABEL_USER: ownership.user_slug(caller.name), ownership.LABEL_KIND: ownership.KIND_TRAINING}
        kinds = [] if self.cache is not None else [k.JOB]
        found = await self.crds.get() if self.flavour != "job" else {}
        kinds += [r for r in (k.PYTORCH_JOB, k.TRAIN_JOB) if found.get(r.kind)]
        results = list(await asyncio.gather(*(self.kube.list(r, self.ns, labels=labels) for r in kinds),
                                            self._pods(labels)))
        if self.cache is not None:
            slug = labels[ownership.LABEL_USER]
            results.insert(0, [j for j in self.cache.jobs.resources.values()
                               if ((j.get("metadata") or {}).get("labels") or {}).get(ownership.LABEL_USER) == slug])
        jobs = [j for items in results[:-1] for j in items if ownership.owned_by(j, caller.name)]
        by_job: dict[str, list[dict[str, Any]]] = {}
        for pod in results[-1]:
            by_job.setdefault(((pod.get("metadata") or {}).get("labels") or {}).get(ownership.LABEL_JOB, ""),
                              []).append(pod)
        statuses = [pol.job_status(j, by_job.get(j["metadata"]["name"], [])) for j in jobs]
        await self._expire_trainjobs(jobs, statuses)
        return sorted(statuses, key=lambda s: s.created, reverse=True)

    async def _expire_trainjobs(self, jobs: list[dict[str, Any]], statuses: list[JobStatus]) -> None:
        """Delete TrainJobs finished longer than ``ttl_seconds_after_finished`` ago (with all they own).

        Why here: the Trainer (v2.0) has no TTL for the TrainJob itself, only for
        its JobSet; the Job and PyTorchJob flavours get theirs from their
        controllers. Deleting while listing keeps the same promise without a
        background loop; a job still shows in the list that deletes it.
        """
        limit = time.time() - self.policy.ttl_seconds_after_finished
        old = [j for j, st in zip(jobs, statuses)
               if j.get("kind") == k.TRAIN_JOB.kind and st.state.finished and st.finished and st.finished < limit]
        self._trainjob_ids.difference_update(j["metadata"]["name"] for j in old)
        for result in await asyncio.gather(*(self.kube.delete(k.TRAIN_JOB, self.ns, j["metadata"]["name"])
                                             for j in old), return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, k.KubeError):
                raise result  # a Kubernetes error is retried on the next list; anything else is a bug

    # ------------------------------------------------------------------ cancel

    async def cancel(self, caller: pol.Caller, job_id: str) -> JobStatus:
        res, job = await self._find(caller, job_id)
        status = await self.get(caller, job_id)
        if status.state.finished:
            return status
        if pending.queue_of(job) and pending.is_suspended(job):
            # still queued in Kueue: nothing ran, and unsuspending it (as the deadline patch below does)
            # would start pods behind Kueue's back; removing it removes its dependants too
            await self.kube.delete(res, self.ns, job_id, propagation="Background")
            if status.run_id:
                await asyncio.to_thread(self.registry.end_run, status.run_id, "KILLED")
            return replace(status, state=JobState.CANCELLED, finished=time.time(),
                           message=f"Cancelled while queued in Kueue LocalQueue {pending.queue_of(job)!r}; no "
                                   f"worker ran, and the job is removed.")
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch: dict[str, Any] = {"metadata": {"annotations": {ownership.ANNOTATION_CANCELLED: now}}}
        if res is k.JOB:
            patch["spec"] = {"activeDeadlineSeconds": 1, "suspend": False}
        elif res is k.TRAIN_JOB:
            # activeDeadlineSeconds is immutable on a TrainJob; suspending makes the
            # Trainer suspend its JobSet, which deletes the pods
            patch["spec"] = {"suspend": True}
        else:
            patch["spec"] = {"runPolicy": {"activeDeadlineSeconds": 1, "suspend": False}}
        await self.kube.patch(res, self.ns, job_id, patch)
        if res is k.TRAIN_JOB:  # the code is not needed any more (the rest goes with the TrainJob)
            await self.kube.delete(k.CONFIG_MAP, self.ns, f"{job_id}-code")
        if status.run_id:
            await asyncio.to_thread(self.registry.end_run, status.run_id, "KILLED")
        return await self.get(caller, job_id)

    # ------------------------------------------------------------------ logs

    async def _read_logs(self, job_id: str, positions: dict[int, lc.RankPosition]
                         ) -> tuple[list[LogLine], dict[int, lc.RankPosition]]:
        """New lines of every rank since ``positions``, and the positions after them.

        A rank's pods are read oldest first: the pod the cursor names up to its
        end, then each newer pod (a worker restarted by the Job's backoff) from
        its first line, announced by a line saying so. A pod the cursor names
        that is gone is followed by the rank's pods created since it.
        """
        pods = await self._pods({ownership.LABEL_JOB: job_id, ownership.LABEL_KIND: ownership.KIND_TRAINING})
        by_rank: dict[int, list[dict[str, Any]]] = {}
        for pod in pods:
            rank = pol.pod_rank(pod)
            if rank is not None and (pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed"):
                by_rank.setdefault(rank, []).append(pod)

        def created(pod: dict[str, Any]) -> int:
            return lc.created_seconds(pod["metadata"].get("creationTimestamp"))

        async def rank_lines(rank: int, rank_pods: list[dict[str, Any]]
                             ) -> tuple[int, list[str], lc.RankPosition | None]:
            rank_pods.sort(key=lambda p: (created(p), p["metadata"].get("name", "")))
            position = positions.get(rank)
            queue, restarted = rank_pods, False
            if position is not None:
                uids = [lc.pod_key(p["metadata"].get("uid") or "") for p in rank_pods]
                if position.uid in uids:
                    queue = rank_pods[uids.index(position.uid):]
                else:  # its pod is gone: the rank's pods created since are new
                    queue = [p for p in rank_pods if created(p) >= position.created]
                    restarted, position = True, None
            out: list[str] = []
            for i, pod in enumerate(queue):
                meta = pod["metadata"]
                if position is None or position.uid != lc.pod_key(meta.get("uid") or ""):
                    if i > 0 or restarted:
                        out.append(f"(worker restarted in a new pod, {meta.get('name')}; its log follows)")
                    position = lc.RankPosition(lc.pod_key(meta.get("uid") or ""), created(pod))
                final = (pod.get("status") or {}).get("phase") != "Running"
                lines, position, done = await self._read_pod_log(meta["name"], position, final)
                out += lines
                if not done or i == len(queue) - 1:
                    break
            return rank, out, position

        lines: list[LogLine] = []
        after = dict(positions)
        for rank, texts, position in await asyncio.gather(*(rank_lines(r, p) for r, p in by_rank.items())):
            lines += [LogLine(rank, t) for t in texts]
            if position is not None:
                after[rank] = position
        return lines, after

    async def _read_pod_log(self, pod: str, position: lc.RankPosition, final: bool
                            ) -> tuple[list[str], lc.RankPosition, bool]:
        """One bounded read of ``pod``'s log from ``position``: (new lines, position after them, whether the
        read reached the end of the log as it is now)."""
        for limit in (position.reread + lc.CHUNK_BYTES, position.reread + lc.MAX_LINE_BYTES):
            try:
                raw = await self.kube.pod_log(self.ns, pod, limit_bytes=limit, since_time=position.since,
                                              timestamps=True)
            except k.KubeError:
                return [], position, True  # not started yet, gone, or the node serves no logs
            truncated = len(raw) >= limit
            new, after = lc.advance(position, lc.stamped_lines(raw, final=final, truncated=truncated))
            if new or not truncated:
                return new, after, not truncated
        new, after = lc.cut_line(raw, position, limit)
        return new, after, False

    async def logs(self, caller: pol.Caller, job_id: str, cursor: str | None,
                   wait: float = 0.0) -> tuple[list[LogLine], str, JobState]:
        """Lines since ``cursor``; with ``wait`` > 0, long-poll until a line arrives or the job ends."""
        positions = lc.parse_cursor(cursor)
        await self._find(caller, job_id)
        deadline = time.monotonic() + max(0.0, min(wait, 30.0))
        while True:
            lines, positions = await self._read_logs(job_id, positions)
            status = await self.get(caller, job_id)
            if lines or status.state.finished or time.monotonic() >= deadline:
                return lines, lc.format_cursor(positions), status.state
            await asyncio.sleep(0.5)
