"""Free GPU capacity per profile, from Kubernetes Node and Pod dicts.

``compute_availability(catalogue, nodes, pods, extra_tolerations=()) ->
dict[str, Availability]``: free capacity per GPU profile = node allocatable minus
the requests of non-terminated pods bound to that node, per extended resource,
over the nodes the profile can land on (:meth:`hubml.profiles.Profile.matches_node`).
:class:`UsageIndex` keeps the same numbers incrementally
(``set_node``/``remove_node``/``set_pod``/``remove_pod``) so that a hub watching
1,000 nodes and 20,000 pods answers in well under a millisecond per profile; tests
check both give identical results.  ``pod_extended_requests(pod)`` is a pod's
effective extended-resource request as the scheduler counts it.

Pure functions over API-shaped dicts: the spawner's informer and the hub service
feed them from watches, tests feed them directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .profiles import Catalogue, Profile
from .quantities import int_quantity

__all__ = ["Availability", "UsageIndex", "compute_availability", "pod_extended_requests"]


@dataclass(frozen=True)
class Availability:
    """Free capacity of one GPU profile's extended resource over its candidate nodes.

    ``free``/``total`` are in units of the resource (GPUs, MIG slices, shares).
    ``startable`` is how many more servers of this profile fit (a count-2 profile
    needs 2 free on one node).  ``full`` means none fits right now.
    """

    profile: str
    resource: str
    free: int
    total: int
    nodes: int
    startable: int

    @property
    def full(self) -> bool:
        return self.startable <= 0


def pod_extended_requests(pod: Mapping[str, Any], resources: Iterable[str] | None = None) -> dict[str, int]:
    """Effective requests of extended resources of a Pod dict (as the scheduler counts them).

    Effective request = max(sum over containers, max over init containers); for
    extended resources the limit is the request when only limits are given.
    """
    spec = pod.get("spec") or {}
    wanted = set(resources) if resources is not None else None

    def reqs(c: Mapping[str, Any]) -> dict[str, int]:
        res = c.get("resources") or {}
        merged = dict(res.get("limits") or {})
        merged.update(res.get("requests") or {})
        return {
            k: int_quantity(v)
            for k, v in merged.items()
            if "/" in k and not k.startswith("hugepages-") and (wanted is None or k in wanted)
        }

    total: dict[str, int] = {}
    for c in spec.get("containers") or ():
        for k, v in reqs(c).items():
            total[k] = total.get(k, 0) + v
    for c in spec.get("initContainers") or ():
        for k, v in reqs(c).items():
            if v > total.get(k, 0):
                total[k] = v
    return {k: v for k, v in total.items() if v}


def _pod_counts(pod: Mapping[str, Any]) -> bool:
    """Non-terminated pods bound to a node hold their requests."""
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed") and bool((pod.get("spec") or {}).get("nodeName"))


class UsageIndex:
    """Incremental per-node allocatable and used extended resources.

    Feed it Node and Pod dicts as a watch delivers them.  Pure data structure:
    the spawner's informer calls it, tests call it directly.  ``generation``
    changes whenever a node's labels/taints/allocatable change, so per-profile
    candidate node lists can be cached between changes.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, Mapping[str, Any]] = {}
        self.allocatable: dict[str, dict[str, int]] = {}
        self.used: dict[str, dict[str, int]] = {}
        self._pod_usage: dict[str, tuple[str, dict[str, int]]] = {}
        self.generation = 0
        self._candidates: dict[tuple, tuple[Profile, list[str]]] = {}

    # nodes
    def set_node(self, node: Mapping[str, Any]) -> None:
        name = node["metadata"]["name"]
        old = self.nodes.get(name)
        self.nodes[name] = node
        alloc = {
            k: int_quantity(v)
            for k, v in ((node.get("status") or {}).get("allocatable") or {}).items()
            if "/" in k and not k.startswith("hugepages-")
        }
        if old is None or _node_shape(old) != _node_shape(node) or self.allocatable.get(name) != alloc:
            self.generation += 1
        self.allocatable[name] = alloc

    def remove_node(self, name: str) -> None:
        if self.nodes.pop(name, None) is not None:
            self.allocatable.pop(name, None)
            self.generation += 1

    # pods
    def set_pod(self, key: str, pod: Mapping[str, Any]) -> None:
        self.remove_pod(key)
        if not _pod_counts(pod):
            return
        req = pod_extended_requests(pod)
        if not req:
            return
        node = pod["spec"]["nodeName"]
        self._pod_usage[key] = (node, req)
        used = self.used.setdefault(node, {})
        for k, v in req.items():
            used[k] = used.get(k, 0) + v

    def remove_pod(self, key: str) -> None:
        prev = self._pod_usage.pop(key, None)
        if prev is None:
            return
        node, req = prev
        used = self.used.get(node, {})
        for k, v in req.items():
            used[k] = used.get(k, 0) - v
            if used[k] <= 0:
                used.pop(k)

    def clear_pods(self) -> None:
        """Forget every pod (before a full re-list)."""
        self._pod_usage.clear()
        self.used.clear()

    def candidates(self, profile: Profile, extra_tolerations: tuple = ()) -> list[str]:
        key = (id(profile), self.generation, repr(extra_tolerations))
        hit = self._candidates.get(key)
        # keep the profile in the value so its id cannot be reused while cached
        if hit is None or hit[0] is not profile:
            if len(self._candidates) > 256:
                self._candidates.clear()
            names = [n for n, node in self.nodes.items() if profile.matches_node(node, extra_tolerations)]
            hit = (profile, names)
            self._candidates[key] = hit
        return hit[1]

    def availability(self, profile: Profile, extra_tolerations: tuple = ()) -> Availability | None:
        """Availability of one profile, or None for CPU profiles."""
        if not profile.gpu:
            return None
        res, need = profile.gpu.resource, profile.gpu.count
        free = total = startable = 0
        names = self.candidates(profile, extra_tolerations)
        for n in names:
            a = self.allocatable[n].get(res, 0)
            f = a - self.used.get(n, {}).get(res, 0)
            if f < 0:
                f = 0
            total += a
            free += f
            startable += f // need
        return Availability(profile.name, res, free, total, len(names), startable)

    def availability_all(self, catalogue: Catalogue, extra_tolerations: tuple = ()) -> dict[str, Availability]:
        out = {}
        for p in catalogue:
            a = self.availability(p, extra_tolerations)
            if a is not None:
                out[p.name] = a
        return out


def _node_shape(node: Mapping[str, Any]) -> tuple:
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    ready = [
        c.get("status") for c in ((node.get("status") or {}).get("conditions") or ()) if c.get("type") == "Ready"
    ]
    return (
        tuple(sorted((meta.get("labels") or {}).items())),
        repr(spec.get("taints")),
        bool(spec.get("unschedulable")),
        tuple(ready),
    )


def compute_availability(
    catalogue: Catalogue,
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    extra_tolerations: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Availability]:
    """Free capacity per GPU profile, from scratch (reference implementation).

    ``nodes`` and ``pods`` are API-shaped dicts (``kubectl get -o json`` items).
    CPU profiles are absent from the result.
    """
    idx = UsageIndex()
    for n in nodes:
        idx.set_node(n)
    for i, p in enumerate(pods):
        meta = p.get("metadata") or {}
        idx.set_pod(f"{meta.get('namespace', '')}/{meta.get('name', i)}", p)
    return idx.availability_all(catalogue, tuple(extra_tolerations))
