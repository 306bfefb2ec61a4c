"""Canary rollouts of a KServe InferenceService in both of KServe's deployment modes (pure, no I/O).

Why a module of its own: the two modes split traffic in unrelated ways, and
the field hubml used to set for both is silently ignored by one of them.

- **Knative** mode (``serving.kserve.io/deploymentMode: Knative``, formerly
  ``Serverless``): ``spec.predictor.canaryTrafficPercent`` sends that share to
  the latest revision and the rest to the previous rolled-out one. Promote =
  drop the field (the latest revision gets everything); roll back = set it to
  0, as KServe's own guide does (both keep the pods running).
- **Standard** mode (raw Deployments, KServe's default; formerly
  ``RawDeployment``) ignores ``canaryTrafficPercent`` (kserve #5335). KServe
  0.20 added named canaries: ``spec.canary[]`` entries ``{predictor: {name,
  ...}, trafficPercent}``, each a Deployment ``{isvc}-{name}-predictor`` whose
  pods the stable predictor's Service also selects, so the split follows the
  replica counts KServe derives from ``trafficPercent``. Promotion without a
  restart = give the stable predictor the canary's name and spec and drop the
  entry (the canary's Deployment becomes the stable one); roll back = drop the
  entry. Older CRDs have no ``spec.canary``: there a Standard-mode canary is
  refused rather than created and ignored.

hubml keeps one canary per deployment and records it (model, version,
percent) in the ``hubml.io/spec`` annotation beside the stable version, so
``%deployments`` can say what serves which share without asking KServe.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from hubml.errors import Conflict, InvalidRequest

from .ownership import spec_record as record_of

#: KServe's annotation choosing how an InferenceService is deployed.
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
MODES = ("Standard", "Knative")
#: the names KServe used before 0.15 for the same two modes
LEGACY_MODES = {"RawDeployment": "Standard", "Serverless": "Knative"}
#: the Standard-mode condition KServe sets once every canary Deployment is available
CANARY_CONDITION = "CanaryPredictorReady"
#: the name KServe gives the predictor's model container
MODEL_CONTAINER = "kserve-container"


def normal_mode(value: str) -> str:
    """``Standard`` or ``Knative`` from a mode name, legacy names included; raises ValueError otherwise."""
    mode = LEGACY_MODES.get(value, value)
    if mode not in MODES:
        raise ValueError(f"KServe deployment mode {value!r} is not one of {', '.join(MODES)} (or the legacy "
                         f"{', '.join(LEGACY_MODES)}).")
    return mode


def mode_of(isvc: dict[str, Any], default: str) -> str:
    """The mode an existing InferenceService runs in (its annotation, else the cluster default)."""
    value = ((isvc.get("metadata") or {}).get("annotations") or {}).get(MODE_ANNOTATION) or default
    try:
        return normal_mode(value)
    except ValueError:
        return normal_mode(default)


def schema_has_canary(schema: dict[str, Any]) -> bool:
    """Whether an InferenceService OpenAPI/CRD schema has Standard-mode named canaries (KServe >= 0.20)."""
    spec = ((schema.get("properties") or {}).get("spec") or {}).get("properties") or {}
    items = (spec.get("canary") or {}).get("items") or {}
    props = items.get("properties") or {}
    return "predictor" in props and "trafficPercent" in props


def canary_name(version: int) -> str:
    """The predictor name of a canary serving model version ``version``: ``v7`` (a DNS label)."""
    return f"v{int(version)}"


@dataclass(frozen=True)
class Change:
    """What to write: the whole new ``spec`` and the new ``hubml.io/spec`` record."""

    spec: dict[str, Any]
    record: dict[str, Any]


def _canary_record(rec: dict[str, Any], what: str, name: str) -> dict[str, Any]:
    canary = rec.get("canary")
    if not isinstance(canary, dict):
        raise Conflict(
            f"Deployment {name!r} has no canary to {what}: it serves {rec.get('model', 'its model')} (version "
            f"{rec.get('version', '?')}) to all traffic. Start one with %deploy MODEL --name {name} --canary PERCENT."
        )
    return canary


def _stable_of(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in ("model", "model_name", "version", "created") if k in rec}


def _predictor_fields(predictor: dict[str, Any]) -> dict[str, Any]:
    """What a canary may differ in from the stable predictor: the model and where its pods run."""
    keep = ("model", "nodeSelector", "affinity", "tolerations")
    fields = {k: copy.deepcopy(v) for k, v in predictor.items() if k in keep}
    # The canary schema (unlike the stable predictor's) requires the model container's name; KServe names
    # the predictor's container kserve-container, so the canary's pods look like the stable ones.
    if isinstance(fields.get("model"), dict):
        fields["model"].setdefault("name", MODEL_CONTAINER)
    return fields


def with_canary(existing: dict[str, Any], new: dict[str, Any], new_record: dict[str, Any], *, mode: str,
                percent: int, has_canary_schema: bool) -> Change:
    """Add (or re-weight) the canary of ``new`` (the InferenceService a plain deploy would write) on ``existing``.

    One canary at a time: the same version again changes its share; another
    version is refused until the running canary is promoted or rolled back,
    so no rollout is ever dropped silently.
    """
    name = existing["metadata"]["name"]
    rec = record_of(existing)
    stable = _stable_of(rec)
    version = int(new_record["version"])
    current = rec.get("canary") if isinstance(rec.get("canary"), dict) else None
    if current is not None and int(current.get("version") or 0) != version:
        raise Conflict(
            f"Deployment {name!r} already has a canary: {current.get('model')} (version {current.get('version')}) "
            f"at {current.get('percent')}%. Finish that rollout first: %deploy --promote {name} or "
            f"%deploy --rollback {name}, then deploy version {version}."
        )
    if current is None and int(stable.get("version") or 0) == version:
        raise Conflict(
            f"Deployment {name!r} already serves version {version} to all traffic; a canary needs another version "
            f"(register one with %register_model, then %deploy MODEL --name {name} --canary {percent})."
        )
    canary = {"model": new_record["model"], "model_name": new_record["model_name"], "version": version,
              "percent": percent, "name": canary_name(version)}
    record = {**stable, "canary": canary}
    if mode == "Knative":
        spec = copy.deepcopy(new["spec"])
        spec["predictor"]["canaryTrafficPercent"] = percent
        return Change(spec=spec, record=record)
    if not has_canary_schema:
        raise InvalidRequest(
            f"--canary cannot split traffic on this cluster: its InferenceServices run in KServe's Standard mode, "
            f"and its KServe (InferenceService CRD without spec.canary, before 0.20) has no Standard-mode canaries "
            f"(it would ignore canaryTrafficPercent). Deploy without --canary, or ask the hub administrator to "
            f"upgrade KServe to 0.20 or later, or to set HubMLService.kserve_deployment_mode = 'Knative'. "
            f"Nothing was changed."
        )
    spec = copy.deepcopy(existing["spec"])
    stable_name = (spec.get("predictor") or {}).get("name") or ""
    if stable_name == canary["name"]:
        raise Conflict(f"Deployment {name!r}'s stable predictor is already named {stable_name!r} (version "
                       f"{version}); deploy another version as the canary.")
    predictor = {"name": canary["name"], **_predictor_fields(new["spec"]["predictor"])}
    spec["canary"] = [{"predictor": predictor, "trafficPercent": percent}]
    return Change(spec=spec, record=record)


def replacement(existing: dict[str, Any], new: dict[str, Any], new_record: dict[str, Any], *, mode: str) -> Change:
    """A plain redeploy (no ``--canary``) of ``existing``: the new version takes all traffic.

    Refused while a canary runs (promote or roll back first). In Standard
    mode the stable predictor keeps its name, so its Deployment is updated in
    place (a rolling update) and its Service, hence the URL, stays.
    """
    name = existing["metadata"]["name"]
    rec = record_of(existing)
    current = rec.get("canary") if isinstance(rec.get("canary"), dict) else None
    if current is not None:
        raise Conflict(
            f"Deployment {name!r} has a canary running: {current.get('model')} (version {current.get('version')}) "
            f"at {current.get('percent')}%. Promote it (%deploy --promote {name}) or roll it back "
            f"(%deploy --rollback {name}) before replacing the model."
        )
    spec = copy.deepcopy(new["spec"])
    if mode == "Standard":
        stable_name = ((existing.get("spec") or {}).get("predictor") or {}).get("name")
        if stable_name:
            spec["predictor"]["name"] = stable_name
    return Change(spec=spec, record=dict(new_record))


def promoted(isvc: dict[str, Any], *, mode: str) -> Change:
    """The canary takes all traffic and becomes the stable version (no pod restarts in either mode)."""
    name = isvc["metadata"]["name"]
    rec = record_of(isvc)
    canary = _canary_record(rec, "promote", name)
    spec = copy.deepcopy(isvc["spec"])
    record = {"model": canary.get("model"), "model_name": canary.get("model_name"),
              "version": canary.get("version"), "created": rec.get("created")}
    if mode == "Knative":
        spec["predictor"].pop("canaryTrafficPercent", None)
        return Change(spec=spec, record=record)
    entries = [c for c in spec.get("canary") or () if (c.get("predictor") or {}).get("name") == canary.get("name")]
    if not entries:
        raise Conflict(f"Deployment {name!r} records a canary {canary.get('name')!r} that its InferenceService no "
                       f"longer has (changed outside hubml?); %deploy the model again to start over.")
    predictor = {**spec["predictor"], **copy.deepcopy(entries[0]["predictor"])}
    spec["predictor"] = predictor
    spec.pop("canary", None)
    return Change(spec=spec, record=record)


def rolled_back(isvc: dict[str, Any], *, mode: str) -> Change:
    """The stable version takes all traffic again; the canary's share goes to 0 (Knative) or it is removed."""
    name = isvc["metadata"]["name"]
    rec = record_of(isvc)
    _canary_record(rec, "roll back", name)
    spec = copy.deepcopy(isvc["spec"])
    if mode == "Knative":
        spec["predictor"]["canaryTrafficPercent"] = 0
    else:
        spec.pop("canary", None)
    return Change(spec=spec, record=_stable_of(rec))


def canary_status(isvc: dict[str, Any], *, mode: str) -> dict[str, Any] | None:
    """The recorded canary with ``ready`` as KServe reports it (None: not reported yet), or None."""
    canary = record_of(isvc).get("canary")
    if not isinstance(canary, dict):
        return None
    status = isvc.get("status") or {}
    ready: bool | None = None
    if mode == "Standard":
        for entry in status.get("canaryStatuses") or ():
            if entry.get("name") == canary.get("name"):
                ready = bool(entry.get("ready"))
        if ready is None:
            cond = next((c for c in status.get("conditions") or () if c.get("type") == CANARY_CONDITION), None)
            if cond is not None:
                ready = cond.get("status") == "True"
    else:
        pred = (status.get("components") or {}).get("predictor") or {}
        created, latest_ready = pred.get("latestCreatedRevision"), pred.get("latestReadyRevision")
        if created:
            ready = created == latest_ready
    return {"model": canary.get("model"), "version": canary.get("version"), "percent": canary.get("percent"),
            "name": canary.get("name"), "ready": ready}
