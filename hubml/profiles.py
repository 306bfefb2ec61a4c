"""The GPU profile catalogue's model, shared by the spawner, the culler, the hub service and the magics.

Hub admins describe what users may run in a few lines (``c.HubMLSpawner.gpu_profiles``,
or the same list in YAML for ``%%train --profile`` / ``%deploy --profile``)::

    [
      {"name": "cpu", "display": "CPU · 2 cores · 4 GiB", "cpu": 2, "memory": "4G", "default": True},
      {"name": "a100", "display": "1 × A100 80GB",
       "gpu": {"model": "A100-SXM4-80GB", "count": 1},
       "cpu": 8, "memory": "64G", "hourly_cost": 4.10, "idle_timeout": "30m", "groups": ["ml-team"]},
      {"name": "mig-small", "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.10gb"}, "cpu": 2, "memory": "16G"},
      {"name": "t4-shared", "gpu": {"model": "Tesla-T4", "shared": True}, "cpu": 2, "memory": "8G"},
    ]

:func:`hubml.profile_config.load_catalogue` validates that list into the immutable
:class:`Catalogue` of :class:`Profile` objects defined here; free capacity per
profile is :mod:`hubml.availability`.  This module is **pure**: no Kubernetes
client, no JupyterHub, no I/O, so every consumer can import it (the culler reads
``idle_timeout_seconds``; the hub service and the magics map a ``--profile`` name
to resources, node selection and tolerations).

Public API (the contract other parts rely on)
---------------------------------------------
``Catalogue``
    ``get(name) -> Profile`` (raises :class:`UnknownProfileError`, a ``ValueError``
    whose message lists the valid names), ``names()``, ``default``, iteration,
    ``len()``, ``allowed_for(groups) -> list[Profile]``, ``gpu_resources()``.
``Profile`` (frozen dataclass)
    ``name``, ``display``, ``description``, ``gpu`` (:class:`GpuRequest` or None),
    ``cpu``, ``cpu_limit``, ``memory_bytes``, ``memory_limit_bytes``, ``hourly_cost``,
    ``idle_timeout_seconds`` (whole seconds, None = hub default), ``groups`` (empty =
    everyone), ``default``, ``images``, ``custom_image``, ``kubespawner_override``.

    - ``resources() -> dict[str, int]``: the extended resources the pod requests
      (requests == limits), e.g. ``{"nvidia.com/gpu": 1}`` or
      ``{"nvidia.com/mig-1g.10gb": 1}``; ``{}`` for CPU profiles.
    - ``node_selector() -> dict[str, str]``: exact-match labels (the profile's own
      ``node_selector`` plus the MIG strategy label for MIG profiles).
    - ``node_affinity() -> list[dict]``: ``matchExpressions`` entries (Kubernetes
      NodeSelectorRequirement dicts) selecting the GPU Feature Discovery product label,
      accepting both ``A100-SXM4-80GB`` and ``NVIDIA-A100-SXM4-80GB`` spellings.
    - ``tolerations() -> list[dict]``: the GPU taint toleration (``nvidia.com/gpu``
      Exists NoSchedule) for GPU profiles, plus the profile's own tolerations.
    - ``pod_labels() -> dict[str, str]`` and ``pod_annotations() -> dict[str, str]``:
      ``hubml.io/profile``, ``hubml.io/gpu-model``, ``hubml.io/hourly-cost`` (labels,
      label-safe values) and, as annotations, the same plus ``hubml.io/idle-timeout``
      (whole seconds), ``hubml.io/gpu-resource``, ``hubml.io/gpu-count``.
    - ``gpu_units``: GPUs this profile counts against a per-user maximum (``count``
      for full GPUs and MIG slices, 1 for a time-sliced share, 0 for CPU).
    - ``matches_node(node, extra_tolerations=()) -> bool``: whether a pod of this
      profile could land on a Kubernetes Node (dict as returned by the API):
      schedulable, Ready, labels selected, taints tolerated, resource advertised.
    - ``allowed_for(groups) -> bool``.
``ProfileConfigError`` / ``UnknownProfileError``
    Both ``ValueError``; the first lists one line per configuration problem.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .quantities import int_quantity

__all__ = [
    "GPU_PRODUCT_LABEL",
    "MIG_STRATEGY_LABEL",
    "GPU_TAINT_KEY",
    "LABEL_PROFILE",
    "LABEL_GPU_MODEL",
    "LABEL_HOURLY_COST",
    "KUEUE_QUEUE_LABEL",
    "ANNOTATION_IDLE_TIMEOUT",
    "ANNOTATION_GPU_RESOURCE",
    "ANNOTATION_GPU_COUNT",
    "ProfileConfigError",
    "UnknownProfileError",
    "GpuRequest",
    "ImageChoice",
    "CustomImage",
    "Profile",
    "Catalogue",
    "suggestion",
]

#: GPU Feature Discovery label carrying the GPU model.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
#: GFD label carrying the MIG strategy (``single`` / ``mixed``).
MIG_STRATEGY_LABEL = "nvidia.com/mig.strategy"
#: Taint key GPU nodes carry (``nvidia.com/gpu=present:NoSchedule``).
GPU_TAINT_KEY = "nvidia.com/gpu"

LABEL_PROFILE = "hubml.io/profile"
LABEL_GPU_MODEL = "hubml.io/gpu-model"
LABEL_HOURLY_COST = "hubml.io/hourly-cost"
#: Kueue's label naming the LocalQueue a workload waits in (on Jobs, PyTorchJobs, TrainJobs and plain pods)
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ANNOTATION_IDLE_TIMEOUT = "hubml.io/idle-timeout"
ANNOTATION_GPU_RESOURCE = "hubml.io/gpu-resource"
ANNOTATION_GPU_COUNT = "hubml.io/gpu-count"


class ProfileConfigError(ValueError):
    """The profile configuration is wrong; ``problems`` has one line per problem."""

    def __init__(self, problems: list[str], source: str = "gpu_profiles"):
        self.problems = list(problems)
        n = len(self.problems)
        header = (
            f"{source} has {n} problem{'s' if n != 1 else ''}; fix them and restart "
            "(see 'GPU profiles (HubMLSpawner)' in the Configuration reference of hubml's README):"
        )
        super().__init__("\n".join([header] + [f"  - {p}" for p in self.problems]))


class UnknownProfileError(ValueError):
    """A profile (or a choice inside it) was asked for that is not configured."""


def suggestion(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, else ``""``.

    Shared by the catalogue's own lookups and its validation, so a misspelled
    profile name and a misspelled key read the same way.
    """
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class GpuRequest:
    """What a profile asks of the GPU device plugin."""

    model: str
    count: int = 1
    mig: str | None = None
    shared: bool = False
    strategy: str = "mixed"
    resource: str = "nvidia.com/gpu"

    @property
    def kind(self) -> str:
        """``full``, ``mig`` or ``shared``."""
        return "mig" if self.mig else "shared" if self.shared else "full"

    def product_labels(self) -> list[str]:
        """Values of ``nvidia.com/gpu.product`` a matching node may carry.

        GFD writes the NVML name with spaces as dashes; drivers since R510 prefix
        it with ``NVIDIA-``.  The single MIG strategy appends ``-MIG-<profile>``, and
        time-slicing (without ``renameByDefault``) appends ``-SHARED``.
        """
        base = self.model[len("NVIDIA-") :] if self.model.upper().startswith("NVIDIA-") else self.model
        suffix = ""
        if self.mig and self.strategy == "single":
            suffix = f"-MIG-{self.mig}"
        elif self.shared:
            suffix = "-SHARED"
        return [base + suffix, "NVIDIA-" + base + suffix]


@dataclass(frozen=True)
class ImageChoice:
    name: str
    display: str
    image: str
    default: bool = False


@dataclass(frozen=True)
class CustomImage:
    validation_regex: str
    display: str = "Other image"
    message: str = "Enter an image name allowed by your administrator"


@dataclass(frozen=True)
class Profile:
    """One validated entry of the catalogue.  Immutable; build with :func:`load_catalogue`."""

    name: str
    display: str
    description: str = ""
    gpu: GpuRequest | None = None
    cpu: float | None = None
    cpu_limit: float | None = None
    memory_bytes: int | None = None
    memory_limit_bytes: int | None = None
    hourly_cost: float | None = None
    idle_timeout_seconds: int | None = None
    groups: tuple[str, ...] = ()
    default: bool = False
    images: tuple[ImageChoice, ...] = ()
    custom_image: CustomImage | None = None
    extra_node_selector: Mapping[str, str] = field(default_factory=dict)
    extra_tolerations: tuple[Mapping[str, Any], ...] = ()
    kubespawner_override: Mapping[str, Any] = field(default_factory=dict)
    #: Kueue LocalQueue (label ``kueue.x-k8s.io/queue-name``); None: not queued
    queue: str | None = None

    # -- what the pod asks for

    def resources(self) -> dict[str, int]:
        """Extended resources requested (requests == limits), e.g. ``{"nvidia.com/gpu": 1}``."""
        return {self.gpu.resource: self.gpu.count} if self.gpu else {}

    @property
    def gpu_units(self) -> int:
        """GPUs counted against a per-user maximum (a time-sliced share counts 1)."""
        if not self.gpu:
            return 0
        return 1 if self.gpu.shared else self.gpu.count

    def node_selector(self) -> dict[str, str]:
        """Exact-match node labels (``nodeSelector``)."""
        sel = dict(self.extra_node_selector)
        if self.gpu and self.gpu.mig:
            sel[MIG_STRATEGY_LABEL] = self.gpu.strategy
        return sel

    def node_affinity(self) -> list[dict[str, Any]]:
        """Required ``matchExpressions`` (to be ANDed into every node selector term)."""
        if not self.gpu:
            return []
        return [{"key": GPU_PRODUCT_LABEL, "operator": "In", "values": self.gpu.product_labels()}]

    def tolerations(self) -> list[dict[str, Any]]:
        """Tolerations this profile adds to the base ones: the GPU taint, then its own."""
        out: list[dict[str, Any]] = []
        if self.gpu:
            out.append({"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"})
        for t in self.extra_tolerations:
            if dict(t) not in out:
                out.append(dict(t))
        return out

    def pod_labels(self) -> dict[str, str]:
        """Labels the culler and the hub service select on (values are label-safe)."""
        labels = {LABEL_PROFILE: self.name}
        if self.gpu:
            labels[LABEL_GPU_MODEL] = self.gpu.model
        if self.hourly_cost is not None:
            labels[LABEL_HOURLY_COST] = f"{self.hourly_cost:.2f}"
        if self.queue:
            labels[KUEUE_QUEUE_LABEL] = self.queue
        return labels

    def pod_annotations(self) -> dict[str, str]:
        """The labels plus what does not fit a label value (resource names, timeouts)."""
        ann = dict(self.pod_labels())
        ann.pop(KUEUE_QUEUE_LABEL, None)  # Kueue reads the label; nothing reads it as an annotation
        if self.idle_timeout_seconds is not None:
            ann[ANNOTATION_IDLE_TIMEOUT] = str(self.idle_timeout_seconds)
        if self.gpu:
            ann[ANNOTATION_GPU_RESOURCE] = self.gpu.resource
            ann[ANNOTATION_GPU_COUNT] = str(self.gpu.count)
        return ann

    def allowed_for(self, groups: Iterable[str]) -> bool:
        """Whether a member of ``groups`` may use this profile (no groups = everyone)."""
        return not self.groups or bool(set(self.groups) & set(groups))

    def describe_gpu(self) -> str:
        """Human name of the GPU part, e.g. ``A100 80GB``, ``A100 80GB MIG 1g.10gb``."""
        if not self.gpu:
            return "CPU"
        m = self.gpu.model
        if m.upper().startswith("NVIDIA-"):
            m = m[7:]
        if m.upper().startswith("TESLA-"):
            m = m[6:]
        m = re.sub(r"-(SXM\d|PCIE|PCIe)-", " ", m)
        m = m.replace("-", " ")
        if self.gpu.mig:
            return f"{m} MIG {self.gpu.mig}"
        if self.gpu.shared:
            return f"{m} (shared)"
        return m

    # -- where it can land

    def node_labels_match(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.node_selector().items():
            if labels.get(k) != v:
                return False
        for expr in self.node_affinity():
            if not _match_expression(expr, labels):
                return False
        return True

    def matches_node(self, node: Mapping[str, Any], extra_tolerations: Iterable[Mapping[str, Any]] = ()) -> bool:
        """Whether a pod of this profile could be scheduled on ``node`` (a Node dict).

        Checks: not cordoned, Ready (when conditions are reported), labels selected,
        every NoSchedule/NoExecute taint tolerated, and the GPU resource advertised.
        """
        spec = node.get("spec") or {}
        if spec.get("unschedulable"):
            return False
        status = node.get("status") or {}
        for cond in status.get("conditions") or ():
            if cond.get("type") == "Ready" and cond.get("status") != "True":
                return False
        labels = (node.get("metadata") or {}).get("labels") or {}
        if not self.node_labels_match(labels):
            return False
        tols = self.tolerations() + [dict(t) for t in extra_tolerations]
        for taint in spec.get("taints") or ():
            if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(
                _tolerates(t, taint) for t in tols
            ):
                return False
        if self.gpu:
            alloc = status.get("allocatable") or {}
            if int_quantity(alloc.get(self.gpu.resource)) <= 0:
                return False
        return True


def _match_expression(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    op = expr.get("operator")
    key = expr.get("key")
    values = expr.get("values") or []
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt"):
        try:
            have, want = int(labels[key]), int(values[0])
        except (KeyError, ValueError, IndexError):
            return False
        return have > want if op == "Gt" else have < want
    return False


def _tolerates(tol: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """Kubernetes toleration semantics (k8s.io/api/core/v1 ToleratesTaint)."""
    if tol.get("effect") and tol.get("effect") != taint.get("effect"):
        return False
    key = tol.get("key")
    if key and key != taint.get("key"):
        return False
    op = tol.get("operator") or "Equal"
    if op == "Exists":
        return True
    if not key:
        return False
    return (tol.get("value") or "") == (taint.get("value") or "")


class Catalogue:
    """An ordered, validated set of profiles.  Build with :func:`load_catalogue`."""

    def __init__(self, profiles: Iterable[Profile]):
        self._profiles = tuple(profiles)
        self._by_name = MappingProxyType({p.name: p for p in self._profiles})

    def __iter__(self) -> Iterator[Profile]:
        return iter(self._profiles)

    def __len__(self) -> int:
        return len(self._profiles)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return [p.name for p in self._profiles]

    def get(self, name: str) -> Profile:
        """The profile called ``name``; :class:`UnknownProfileError` names the valid ones."""
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise UnknownProfileError(
                f"unknown profile {name!r}{suggestion(str(name), self._by_name)}; "
                f"configured profiles: {', '.join(self._by_name) or '(none)'}"
            ) from None

    @property
    def default(self) -> Profile | None:
        """The profile marked ``default``, else the first one, else None."""
        for p in self._profiles:
            if p.default:
                return p
        return self._profiles[0] if self._profiles else None

    def allowed_for(self, groups: Iterable[str]) -> list[Profile]:
        g = set(groups)
        return [p for p in self._profiles if p.allowed_for(g)]

    def gpu_resources(self) -> set[str]:
        """Every extended resource some profile requests."""
        return {p.gpu.resource for p in self._profiles if p.gpu}
