"""Deployments on Kubernetes: KServe InferenceService where installed, else Deployment + Service + HPA.

Deployment names share the service's namespace: a name another user holds
answers 409 on create and 403 on read/delete, never that user's data.
Deploying again under one's own name replaces the model in place (a rolling
update of the Deployment, or a new KServe revision), so the endpoint never
goes away; on KServe it may instead start a canary beside the running
version, which ``promote``/``rollback`` finish (``canary`` says how per mode).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from hubml import names
from hubml.errors import Conflict, InvalidRequest, NotFound
from hubml.models import DeploySpec, DeploymentInfo, ModelRef
from hubml.registry import Registry

from . import kube as k
from . import canary, ownership, serving_objects, storage_uris, policy as pol
from .endpoints import Endpoints
from .training import CrdCache

_DEPLOY_FIELDS = {"model", "name", "profile", "min_replicas", "max_replicas", "canary_percent"}


def deploy_spec_from_body(body: dict[str, Any]) -> DeploySpec:
    unknown = sorted(set(body) - _DEPLOY_FIELDS)
    if unknown:
        raise InvalidRequest(f"Unknown field(s) in deployment request: {', '.join(unknown)}.")
    if "model" not in body or "name" not in body:
        raise InvalidRequest("A deployment request needs 'model' (NAME, NAME@alias or NAME/version) and 'name'.")
    kw = {key: body[key] for key in ("profile", "min_replicas", "max_replicas", "canary_percent") if key in body}
    return DeploySpec(model=ModelRef.parse(body["model"]), name=body["name"], **kw).validate()


@dataclass(frozen=True)
class KServeSettings:
    """How InferenceServices are made: ``HubMLService.kserve_deployment_mode``, ``kserve_runtime``,
    ``kserve_storage_uri_map``."""

    mode: str = "Standard"
    runtime: str = "hubml-mlflow"
    storage_uri_map: dict[str, str] = field(default_factory=dict)

    def validate(self) -> "KServeSettings":
        canary.normal_mode(self.mode)
        if self.runtime:
            names.dns_label(self.runtime, "kserve_runtime")
        storage_uris.check_map(self.storage_uri_map)
        return self


def deployment_info(obj: dict[str, Any], endpoints: Endpoints = Endpoints(),
                    default_mode: str = "Standard") -> DeploymentInfo:
    """A ``DeploymentInfo`` from an InferenceService or a Deployment, as the API server reports it.

    ``url`` is where notebook pods reach it (``endpoints``: KServe's own reported
    address when set, else the administrator's template, else in-cluster DNS).
    """
    meta = obj.get("metadata") or {}
    rec = pol.spec_record(obj)
    status = obj.get("status") or {}
    name = meta.get("name", "")
    message = ""
    if obj.get("kind") == "InferenceService":
        conds = {c.get("type"): c for c in status.get("conditions") or ()}
        ready = conds.get("Ready") or {}
        state = "ready" if ready.get("status") == "True" else "failed" if ready.get("reason") in (
            "RevisionFailed", "ContainerHealthy") else "starting"
        message = ready.get("message") or ""
        canary_now = canary.canary_status(obj, mode=canary.mode_of(obj, default_mode))
    else:
        canary_now = None
        conds = {c.get("type"): c for c in status.get("conditions") or ()}
        if (status.get("readyReplicas") or 0) >= 1:
            state = "ready"
        elif (conds.get("ReplicaFailure") or {}).get("status") == "True" or \
                (conds.get("Progressing") or {}).get("reason") == "ProgressDeadlineExceeded":
            state = "failed"
            message = (conds.get("ReplicaFailure") or conds.get("Progressing") or {}).get("message", "")
        else:
            state = "starting"
    url = endpoints.url_for(obj)
    return DeploymentInfo(name=name, model=str(rec.get("model", "")), version=int(rec.get("version") or 0),
                          url=url, state=state, backend="hub", created=float(rec.get("created") or 0),
                          message=message, canary=canary_now)


class Serving:
    def __init__(self, kube: k.Kube, registry: Registry, policy: pol.Policy, crds: CrdCache, *,
                 flavour: str = "auto", mlflow_pod_uri: str, endpoints: Endpoints = Endpoints(),
                 kserve: KServeSettings = KServeSettings()) -> None:
        self.kube = kube
        self.registry = registry
        self.policy = policy
        self.crds = crds
        self.flavour = flavour
        self.mlflow_pod_uri = mlflow_pod_uri
        self.endpoints = endpoints.validate()
        self.kserve = kserve.validate()

    def _info(self, obj: dict[str, Any]) -> DeploymentInfo:
        return deployment_info(obj, self.endpoints, canary.normal_mode(self.kserve.mode))

    @property
    def ns(self) -> str:
        return self.policy.namespace

    async def _kserve(self) -> bool:
        return await self.crds.use_operator(self.flavour, "kserve", "InferenceService")

    async def _objects(self, caller: pol.Caller) -> list[dict[str, Any]]:
        labels = {ownership.LABEL_USER: ownership.user_slug(caller.name), ownership.LABEL_KIND: ownership.KIND_SERVING}
        kinds = [k.DEPLOYMENT] + ([k.INFERENCE_SERVICE] if (await self.crds.get()).get("InferenceService") else [])
        found = await asyncio.gather(*(self.kube.list(r, self.ns, labels=labels) for r in kinds))
        return [o for items in found for o in items if ownership.owned_by(o, caller.name)]

    async def _find(self, name: str) -> dict[str, Any] | None:
        if (await self.crds.get()).get("InferenceService"):
            obj = await self.kube.get_or_none(k.INFERENCE_SERVICE, self.ns, name)
            if obj is not None:
                return obj
        return await self.kube.get_or_none(k.DEPLOYMENT, self.ns, name)

    async def list(self, caller: pol.Caller) -> list[DeploymentInfo]:
        infos = [self._info(o) for o in await self._objects(caller)]
        return sorted(infos, key=lambda d: d.name)

    async def get(self, caller: pol.Caller, name: str) -> DeploymentInfo:
        self._check_name(name)
        obj = pol.require_owner(await self._find(name), caller, "Deployment", name)
        return self._info(obj)

    @staticmethod
    def _check_name(name: str) -> None:
        try:
            names.dns_label(name, "Deployment name")
        except InvalidRequest:
            raise NotFound(f"Deployment {name!r} does not exist.") from None

    async def deploy(self, caller: pol.Caller, body: dict[str, Any]) -> DeploymentInfo:
        spec = deploy_spec_from_body(body)
        kserve = await self._kserve()
        existing_obj = await self._find(spec.name)
        if existing_obj is not None and not ownership.owned_by(existing_obj, caller.name):
            raise Conflict(f"The deployment name {spec.name!r} is taken by another user; choose another --name.")
        mine = [o["metadata"]["name"] for o in await self._objects(caller)]
        # every refusal policy can make first (no I/O), then the registry, then the plan, once
        admitted = pol.admit_serving(self.policy, caller, spec, kserve=kserve, existing=mine)
        if spec.canary_percent is not None and existing_obj is not None and existing_obj.get("kind") != "InferenceService":
            raise InvalidRequest(
                f"Deployment {spec.name!r} runs as a plain Deployment (made before KServe served here), which has "
                f"no canaries: %undeploy {spec.name} and deploy again to move it to KServe, then use --canary."
            )
        version, uri = await asyncio.to_thread(self.registry.storage_uri, spec.model, caller.name)
        if kserve:
            uri = storage_uris.for_kserve(uri, self.kserve.storage_uri_map, model=f"{spec.model} (version {version})")
        plan = pol.assemble_serving(self.policy, caller, admitted, version=version, storage_uri=uri,
                                    env={"MLFLOW_TRACKING_URI": self.mlflow_pod_uri},
                                    runtime=self.kserve.runtime, deployment_mode=canary.normal_mode(self.kserve.mode))
        if kserve:
            isvc = serving_objects.inference_service(plan)
            if existing_obj is not None and existing_obj.get("kind") == "InferenceService":
                mode = canary.mode_of(existing_obj, plan.deployment_mode)
                new_record = pol.spec_record(isvc)
                if spec.canary_percent is not None:
                    change = canary.with_canary(existing_obj, isvc, new_record, mode=mode,
                                                percent=spec.canary_percent,
                                                has_canary_schema=mode == "Standard" and await self.crds.kserve_canary())
                else:
                    change = canary.replacement(existing_obj, isvc, new_record, mode=mode)
                obj = await self._write(existing_obj, change)
            else:
                if existing_obj is not None:
                    await self._delete_trio(caller, spec.name)
                obj = await self.kube.create(isvc)
            return self._info(obj)
        dep = serving_objects.scoring_deployment(plan)
        if existing_obj is not None and existing_obj.get("kind") == "Deployment":
            obj = await self.kube.patch(k.DEPLOYMENT, self.ns, spec.name,
                                        {"metadata": {"annotations": dep["metadata"]["annotations"]},
                                         "spec": dep["spec"]})
            await self.kube.patch(k.HPA, self.ns, spec.name, {"spec": serving_objects.scoring_hpa(plan)["spec"]})
            return self._info(obj)
        obj = await self.kube.create(dep)
        try:
            owner = ownership.owner_reference(obj)
            await asyncio.gather(self.kube.create(serving_objects.scoring_service(plan, owner)),
                                 self.kube.create(serving_objects.scoring_hpa(plan, owner)))
        except BaseException:
            await self._delete_trio(caller, spec.name)
            raise
        return self._info(obj)

    async def _write(self, existing: dict[str, Any], change: canary.Change) -> dict[str, Any]:
        """Replace an InferenceService's spec and hubml record in one JSON patch, only if nobody changed it since
        it was read (the ``test`` of its resourceVersion), so no concurrent rollout step is lost."""
        meta = existing["metadata"]
        ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]},
               {"op": "replace", "path": "/spec", "value": change.spec},
               {"op": "add", "path": "/metadata/annotations/" + ownership.ANNOTATION_SPEC.replace("/", "~1"),
                "value": json.dumps(change.record, sort_keys=True, separators=(",", ":"))}]
        try:
            return await self.kube.json_patch(k.INFERENCE_SERVICE, self.ns, meta["name"], ops)
        except k.Invalid as e:
            if "test" in str(e) and "resourceVersion" in str(e):
                raise Conflict(f"Deployment {meta['name']!r} changed while this request was handled (another "
                               f"%deploy?); look at %deployments and try again. Nothing was changed.") from None
            raise

    async def _rollout_step(self, caller: pol.Caller, name: str, step: str) -> DeploymentInfo:
        self._check_name(name)
        obj = pol.require_owner(await self._find(name), caller, "Deployment", name)
        if obj.get("kind") != "InferenceService":
            raise Conflict(f"Deployment {name!r} has no canary to {step.replace('_', ' ')}: it is a plain Deployment "
                           f"(no KServe), which always serves one version.")
        mode = canary.mode_of(obj, canary.normal_mode(self.kserve.mode))
        change = canary.promoted(obj, mode=mode) if step == "promote" else canary.rolled_back(obj, mode=mode)
        return self._info(await self._write(obj, change))

    async def promote(self, caller: pol.Caller, name: str) -> DeploymentInfo:
        """The canary of ``name`` takes all traffic and becomes its stable version (409 without a canary)."""
        return await self._rollout_step(caller, name, "promote")

    async def rollback(self, caller: pol.Caller, name: str) -> DeploymentInfo:
        """The stable version of ``name`` takes all traffic again; the canary goes (409 without a canary)."""
        return await self._rollout_step(caller, name, "roll_back")

    async def _delete_trio(self, caller: pol.Caller, name: str) -> None:
        """Delete the Deployment, Service and HPA called ``name`` that are the caller's (only those)."""
        for res in (k.DEPLOYMENT, k.SERVICE, k.HPA):
            obj = await self.kube.get_or_none(res, self.ns, name)
            if obj is not None and ownership.owned_by(obj, caller.name) and \
                    (obj["metadata"].get("labels") or {}).get(ownership.LABEL_KIND) == ownership.KIND_SERVING:
                await self.kube.delete(res, self.ns, name)

    async def delete(self, caller: pol.Caller, name: str) -> None:
        self._check_name(name)
        obj = pol.require_owner(await self._find(name), caller, "Deployment", name)
        if obj.get("kind") == "InferenceService":
            await self.kube.delete(k.INFERENCE_SERVICE, self.ns, name)
        else:
            await self._delete_trio(caller, name)
