"""Loading the GPU profile catalogue: a list of dicts from an admin becomes a :class:`~hubml.profiles.Catalogue`.

``load_catalogue(entries, *, known_override_keys=None, source="gpu_profiles") -> Catalogue``
validates everything at once and raises :class:`~hubml.profiles.ProfileConfigError`
(a ``ValueError``) listing one line per problem, each naming the profile and the
field (``profile 'a100' (#2), field 'gpu.mig': ...``).  Nothing is half-built, so
an admin fixes the file once instead of once per restart.  ``known_override_keys``
(the spawner passes KubeSpawner's trait names) lets misspelled
``kubespawner_override`` keys be refused with a suggestion.

The rules themselves live where every other part reads them too: durations,
memory sizes in :mod:`hubml.quantities` (``idle_timeout`` means what the culler's
settings and ``%%train --timeout`` mean), images and Kubernetes label, node
selector and taint keys in :mod:`hubml.names` (an image accepted here is accepted
when the hub service plans a job).  Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from .errors import InvalidRequest
from .mig import MIG_CATALOGUE, MIG_PROFILE_RE, family_for_model
from .names import image_reference, label_value, qualified_name
from .profiles import (
    Catalogue,
    CustomImage,
    GpuRequest,
    ImageChoice,
    Profile,
    ProfileConfigError,
    suggestion,
)
from .quantities import parse_duration, parse_memory

__all__ = ["load_catalogue"]

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_RESOURCE_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.+]*[A-Za-z0-9])?$")

_PROFILE_KEYS = {
    "name": "short slug used in URLs, labels and --profile",
    "display": "text shown in the form",
    "description": "longer text shown in the form",
    "gpu": "the GPU request: {model, count, mig, shared, strategy, resource}",
    "cpu": "CPU cores guaranteed",
    "cpu_limit": "CPU cores limit (defaults to cpu)",
    "memory": "memory guaranteed, e.g. '16G'",
    "memory_limit": "memory limit (defaults to memory)",
    "hourly_cost": "cost per hour shown in the form and put on the pod",
    "idle_timeout": "how long an idle server lives, e.g. '30m'",
    "groups": "JupyterHub groups allowed to use the profile",
    "default": "pre-selected in the form",
    "images": "image choices: {choice: image} or [{name, display, image, default}]",
    "custom_image": "free-text image allowed: {validation_regex, display, message}",
    "node_selector": "extra node labels required",
    "tolerations": "extra tolerations (added to the base ones)",
    "queue": "Kueue LocalQueue the profile's pods and training jobs wait in (label kueue.x-k8s.io/queue-name)",
    "kubespawner_override": "any other KubeSpawner trait to override",
}
_GPU_KEYS = {"model", "count", "mig", "shared", "strategy", "resource"}
_IMAGE_KEYS = {"name", "display", "image", "default"}
_CUSTOM_IMAGE_KEYS = {"validation_regex", "display", "message"}
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_TAINT_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _refusal(check: Callable[..., object], *args: Any, **kwargs: Any) -> str | None:
    """What a :mod:`hubml.names` check says against a value, or None: problems are collected, not raised."""
    try:
        check(*args, **kwargs)
    except InvalidRequest as e:
        return str(e)
    return None


def _dict_of_known_keys(value: Any, where: str, known: set[str], bad, shape: str, noun: str = "key") -> bool:
    """Whether ``value`` is a dict (else ``shape`` is the problem); each unknown key is a problem too."""
    if not isinstance(value, Mapping):
        bad(where, shape)
        return False
    for k in value:
        if k not in known:
            bad(f"{where}.{k}", f"unknown {noun}{suggestion(str(k), known)}")
    return True


def _anchored(regex: str) -> bool:
    return regex.startswith("^") and (regex.endswith("$") and not regex.endswith("\\$") or regex.endswith("\\Z"))


def load_catalogue(
    entries: Any,
    *,
    known_override_keys: Iterable[str] | None = None,
    source: str = "gpu_profiles",
) -> Catalogue:
    """Validate ``entries`` (a list of dicts) and build a :class:`Catalogue`.

    All problems are collected before raising, so an admin fixes the file once.
    """
    problems: list[str] = []
    if not isinstance(entries, (list, tuple)):
        raise ProfileConfigError(
            [f"must be a list of profile dicts, got {type(entries).__name__}"], source
        )
    known = set(known_override_keys) if known_override_keys is not None else None
    profiles: list[Profile] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries, start=1):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if isinstance(name, str) and name in seen:
            problems.append(
                f"profile {name!r} (#{i}), field 'name': duplicate of profile #{seen[name]}; names must be unique"
            )
        elif isinstance(name, str):
            seen[name] = i
        p = _load_one(i, entry, known, problems)
        if p is not None:
            profiles.append(p)
    defaults = [p.name for p in profiles if p.default]
    if len(defaults) > 1:
        problems.append(
            f"profiles {', '.join(repr(d) for d in defaults)}, field 'default': "
            "several profiles are marked default; keep 'default': True on one"
        )
    if problems:
        raise ProfileConfigError(problems, source)
    return Catalogue(profiles)


def _load_one(i: int, entry: Any, known: set[str] | None, problems: list[str]) -> Profile | None:
    if not isinstance(entry, Mapping):
        problems.append(f"profile #{i}: must be a dict, got {type(entry).__name__}")
        return None
    raw_name = entry.get("name")
    label = f"profile {raw_name!r} (#{i})" if isinstance(raw_name, str) and raw_name else f"profile #{i}"
    n_before = len(problems)

    def bad(fieldname: str, msg: str) -> None:
        problems.append(f"{label}, field '{fieldname}': {msg}")

    for k in entry:
        if k not in _PROFILE_KEYS:
            bad(str(k), f"unknown key{suggestion(str(k), _PROFILE_KEYS)}; known keys: {', '.join(_PROFILE_KEYS)}")

    name = entry.get("name")
    if name is None:
        bad("name", "missing; every profile needs a short name like 'a100'")
    elif not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 63:
        bad("name", f"{name!r} must be lowercase letters, digits and '-' (at most 63), like 'a100-x2'")

    display = entry.get("display", name if isinstance(name, str) else "")
    if not isinstance(display, str) or not display.strip():
        bad("display", "must be a non-empty string")
    description = entry.get("description", "")
    if not isinstance(description, str):
        bad("description", "must be a string")

    gpu = _load_gpu(entry.get("gpu"), bad) if "gpu" in entry else None

    cpu = entry.get("cpu")
    if cpu is not None and (not _is_number(cpu) or cpu <= 0):
        bad("cpu", f"{cpu!r} must be a positive number of cores, e.g. 2 or 0.5")
        cpu = None
    cpu_limit = entry.get("cpu_limit")
    if cpu_limit is not None:
        if not _is_number(cpu_limit) or cpu_limit <= 0:
            bad("cpu_limit", f"{cpu_limit!r} must be a positive number of cores")
            cpu_limit = None
        elif cpu is not None and cpu_limit < cpu:
            bad("cpu_limit", f"{cpu_limit} is below cpu {cpu}; a limit cannot be lower than the guarantee")

    mem = mem_limit = None
    if entry.get("memory") is not None:
        try:
            mem = parse_memory(entry["memory"])
        except ValueError as e:
            bad("memory", str(e))
    if entry.get("memory_limit") is not None:
        try:
            mem_limit = parse_memory(entry["memory_limit"])
        except ValueError as e:
            bad("memory_limit", str(e))
        else:
            if mem is not None and mem_limit < mem:
                bad("memory_limit", "is below memory; a limit cannot be lower than the guarantee")

    cost = entry.get("hourly_cost")
    if cost is not None and (not _is_number(cost) or cost < 0):
        bad("hourly_cost", f"{cost!r} must be a number >= 0 (cost per hour)")
        cost = None

    idle = None
    if entry.get("idle_timeout") is not None:
        try:
            # whole seconds for the pod annotation; rounded up so '0.5s' never becomes 0
            idle = math.ceil(parse_duration(entry["idle_timeout"]))
        except ValueError as e:
            bad("idle_timeout", str(e))

    groups = entry.get("groups", [])
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, str) and g.strip() for g in groups):
        bad("groups", "must be a list of JupyterHub group names, e.g. ['ml-team']")
        groups = []
    elif "groups" in entry and not groups:
        bad("groups", "is empty, which would hide the profile from everyone; remove the key to allow all users")

    default = entry.get("default", False)
    if not isinstance(default, bool):
        bad("default", f"{default!r} must be True or False")
        default = False

    images = _load_images(entry.get("images"), bad) if "images" in entry else ()
    custom = _load_custom_image(entry.get("custom_image"), bad) if "custom_image" in entry else None

    node_selector = entry.get("node_selector", {})
    if not isinstance(node_selector, Mapping):
        bad("node_selector", "must be a dict of node label -> value")
        node_selector = {}
    else:
        for k, v in node_selector.items():
            for refusal in (_refusal(qualified_name, k), _refusal(label_value, v, k)):
                if refusal:
                    bad("node_selector", refusal)

    tolerations = entry.get("tolerations", [])
    if not isinstance(tolerations, (list, tuple)):
        bad("tolerations", "must be a list of toleration dicts")
        tolerations = []
    else:
        for j, t in enumerate(tolerations):
            _check_toleration(t, f"tolerations[{j}]", bad)

    queue = entry.get("queue")
    if queue is not None and (not isinstance(queue, str) or not _NAME_RE.match(queue) or len(queue) > 63):
        bad("queue", f"{queue!r} must name a Kueue LocalQueue in the users' namespace: lowercase letters, digits "
                     "and '-' (at most 63), like 'team-a-gpus'")
        queue = None

    override = entry.get("kubespawner_override", {})
    if not isinstance(override, Mapping):
        bad("kubespawner_override", "must be a dict of KubeSpawner trait name -> value")
        override = {}
    elif known is not None:
        for k in override:
            if k not in known:
                bad(f"kubespawner_override.{k}", f"no such KubeSpawner setting{suggestion(str(k), known)}")

    if len(problems) > n_before:
        return None
    return Profile(
        name=name,
        display=display.strip(),
        description=description,
        gpu=gpu,
        cpu=float(cpu) if cpu is not None else None,
        cpu_limit=float(cpu_limit) if cpu_limit is not None else None,
        memory_bytes=mem,
        memory_limit_bytes=mem_limit,
        hourly_cost=float(cost) if cost is not None else None,
        idle_timeout_seconds=idle,
        groups=tuple(groups),
        default=default,
        images=images,
        custom_image=custom,
        extra_node_selector=MappingProxyType(dict(node_selector)),
        extra_tolerations=tuple(MappingProxyType(dict(t)) for t in tolerations),
        kubespawner_override=MappingProxyType(dict(override)),
        queue=queue,
    )


def _load_gpu(gpu: Any, bad) -> GpuRequest | None:
    if not isinstance(gpu, Mapping):
        bad("gpu", "must be a dict like {'model': 'A100-SXM4-80GB', 'count': 1}")
        return None
    ok = True
    for k in gpu:
        if k not in _GPU_KEYS:
            bad(f"gpu.{k}", f"unknown key{suggestion(str(k), _GPU_KEYS)}; known: {', '.join(sorted(_GPU_KEYS))}")
            ok = False
    model = gpu.get("model")
    if not model or _refusal(label_value, model):
        bad("gpu.model", f"{model!r} must be the GPU Feature Discovery product label, e.g. 'A100-SXM4-80GB' or 'Tesla-T4'")
        return None
    count = gpu.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        bad("gpu.count", f"{count!r} must be a whole number >= 1")
        ok = False
    mig = gpu.get("mig")
    shared = gpu.get("shared", False)
    if not isinstance(shared, bool):
        bad("gpu.shared", f"{shared!r} must be True or False")
        ok = False
    strategy = gpu.get("strategy", "mixed")
    if mig is not None:
        fam = family_for_model(model)
        if not isinstance(mig, str) or not MIG_PROFILE_RE.match(mig):
            bad("gpu.mig", f"{mig!r} is not a MIG profile name like '1g.10gb'")
            ok = False
        elif fam is None:
            families = ", ".join(f"{f.name} ({f.models[0]})" for f in MIG_CATALOGUE.values())
            bad("gpu.mig", f"model {model!r} does not support MIG; MIG models: {families}")
            ok = False
        elif mig not in fam.profiles:
            bad(
                "gpu.mig",
                f"{mig!r} does not exist on {model} ({fam.name}); valid: {', '.join(fam.profiles)}",
            )
            ok = False
        if shared is True:
            bad("gpu.shared", "a profile is either a MIG slice or a time-sliced share, not both")
            ok = False
        if strategy not in ("mixed", "single"):
            bad("gpu.strategy", f"{strategy!r} must be 'mixed' or 'single' (the device plugin's MIG strategy)")
            ok = False
    elif "strategy" in gpu:
        bad("gpu.strategy", "only applies to MIG profiles (set 'mig')")
        ok = False
    if shared is True and isinstance(count, int) and count > 1:
        bad("gpu.count", "a time-sliced share is requested one at a time (count 1): more replicas give no more GPU")
        ok = False
    if mig and strategy == "single":
        default_resource = "nvidia.com/gpu"
    elif mig:
        default_resource = f"nvidia.com/mig-{mig}"
    else:
        default_resource = "nvidia.com/gpu"
    resource = gpu.get("resource", default_resource)
    if not isinstance(resource, str) or not _RESOURCE_RE.match(resource):
        bad("gpu.resource", f"{resource!r} is not an extended resource name like 'nvidia.com/gpu'")
        ok = False
    if not ok:
        return None
    return GpuRequest(
        model=model,
        count=count,
        mig=mig,
        shared=shared,
        strategy=strategy if mig else "mixed",
        resource=resource,
    )


def _load_images(images: Any, bad) -> tuple[ImageChoice, ...]:
    out: list[ImageChoice] = []
    if isinstance(images, Mapping):
        items = [{"name": k, "image": v} for k, v in images.items()]
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        bad("images", "must be {choice: image} or a list of {name, display, image, default}")
        return ()
    if not items:
        bad("images", "is empty; remove the key to use the hub's default image")
        return ()
    seen = set()
    for j, it in enumerate(items):
        where = f"images[{j}]"
        if not _dict_of_known_keys(it, where, _IMAGE_KEYS, bad, "must be a dict with name and image"):
            continue
        name, image = it.get("name"), it.get("image")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            bad(f"{where}.name", f"{name!r} must be a slug like 'pytorch'")
            continue
        if name in seen:
            bad(f"{where}.name", f"duplicate image choice {name!r}")
        seen.add(name)
        refusal = _refusal(image_reference, image, what="")
        if refusal:
            bad(f"{where}.image", refusal)
            continue
        display = it.get("display", name)
        dflt = it.get("default", False)
        if not isinstance(display, str) or not isinstance(dflt, bool):
            bad(where, "display must be a string and default True/False")
            continue
        out.append(ImageChoice(name, display, image, dflt))
    if sum(c.default for c in out) > 1:
        bad("images", "several image choices are marked default; keep one")
    return tuple(out)


def _load_custom_image(ci: Any, bad) -> CustomImage | None:
    if not isinstance(ci, Mapping):
        bad("custom_image", "must be a dict with validation_regex, e.g. {'validation_regex': '^quay\\\\.io/ml/.+$'}")
        return None
    for k in ci:
        if k not in _CUSTOM_IMAGE_KEYS:
            bad(f"custom_image.{k}", f"unknown key{suggestion(str(k), _CUSTOM_IMAGE_KEYS)}")
            return None
    rx = ci.get("validation_regex")
    if not isinstance(rx, str) or not rx:
        bad("custom_image.validation_regex", "is required: a free-text image must be checked against an anchored regex")
        return None
    try:
        re.compile(rx)
    except re.error as e:
        bad("custom_image.validation_regex", f"does not compile: {e}")
        return None
    if not _anchored(rx):
        bad(
            "custom_image.validation_regex",
            f"{rx!r} is not anchored; start it with '^' and end it with '$' so that "
            "'allowed-image; anything' cannot pass",
        )
        return None
    display = ci.get("display", "Other image")
    message = ci.get("message", "Enter an image name allowed by your administrator")
    if not isinstance(display, str) or not isinstance(message, str):
        bad("custom_image", "display and message must be strings")
        return None
    return CustomImage(rx, display, message)


def _check_toleration(t: Any, where: str, bad) -> None:
    shape = "must be a dict like {'key': 'dedicated', 'operator': 'Equal', 'value': 'ml', 'effect': 'NoSchedule'}"
    if not _dict_of_known_keys(t, where, _TOLERATION_KEYS, bad, shape, noun="toleration field"):
        return
    op = t.get("operator", "Equal")
    if op not in ("Equal", "Exists"):
        bad(f"{where}.operator", f"{op!r} must be 'Equal' or 'Exists'")
    if op == "Exists" and t.get("value"):
        bad(f"{where}.value", "must be empty when operator is 'Exists'")
    eff = t.get("effect")
    if eff not in (None, "") and eff not in _TAINT_EFFECTS:
        bad(f"{where}.effect", f"{eff!r} must be one of {', '.join(sorted(_TAINT_EFFECTS))}")
    key = t.get("key")
    refusal = _refusal(qualified_name, key, kind="taint key") if key not in (None, "") else None
    if refusal:
        bad(f"{where}.key", refusal)
