"""List-extending merges for profile overrides (pure).

KubeSpawner's ``kubespawner_override`` merges dicts but *replaces* lists: a
profile that adds the GPU toleration silently drops every toleration the admin
configured for all pods, a long-standing complaint of KubeSpawner users.  Here a
profile's list settings *extend* the base.

Node affinity needs care: ``node_affinity_required`` is a list of
NodeSelectorTerms that Kubernetes ORs together.  Appending the profile's term
would let the pod land on a node matching *either* requirement; the profile's
requirements must hold *as well as* the base ones, so they are ANDed into every
base term instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

#: List traits whose profile values extend the base configuration by default.
DEFAULT_EXTEND_TRAITS = (
    "tolerations",
    "node_affinity_required",
    "node_affinity_preferred",
    "volumes",
    "volume_mounts",
    "init_containers",
    "extra_containers",
)


def as_list(value: Any) -> list:
    """KubeSpawner accepts these traits as a list or as a dict sorted by key."""
    if isinstance(value, Mapping):
        return [value[k] for k in sorted(value)]
    return list(value or [])


def extend_unique(base: Any, extra: Any) -> list:
    """``base`` followed by the items of ``extra`` not already in it (order kept)."""
    out = [copy.deepcopy(x) for x in as_list(base)]
    for item in as_list(extra):
        if item not in out:
            out.append(copy.deepcopy(item))
    return out


def extend_by_name(base: Any, extra: Any) -> list:
    """For volumes/containers: an item of ``extra`` replaces the base item with the
    same ``name`` (two volumes with one name would be rejected by the API server)."""
    out = [copy.deepcopy(x) for x in as_list(base)]
    for item in as_list(extra):
        name = item.get("name") if isinstance(item, Mapping) else None
        idx = next((i for i, b in enumerate(out) if isinstance(b, Mapping) and name and b.get("name") == name), None)
        if idx is None:
            if item not in out:
                out.append(copy.deepcopy(item))
        else:
            out[idx] = copy.deepcopy(item)
    return out


def and_node_selector_terms(base: Any, extra: Any) -> list:
    """AND the profile's NodeSelectorTerms into the base ones.

    (b1 OR b2) AND (e1 OR e2) == (b1∧e1) OR (b1∧e2) OR (b2∧e1) OR (b2∧e2),
    where ∧ of two terms concatenates their matchExpressions/matchFields.
    """
    b_terms, e_terms = as_list(base), as_list(extra)
    if not b_terms:
        return copy.deepcopy(e_terms)
    if not e_terms:
        return copy.deepcopy(b_terms)
    out = []
    for b in b_terms:
        for e in e_terms:
            term: dict[str, list] = {}
            for key in ("matchExpressions", "matchFields"):
                items = [copy.deepcopy(x) for x in (b.get(key) or [])]
                for x in e.get(key) or []:
                    if x not in items:
                        items.append(copy.deepcopy(x))
                if items:
                    term[key] = items
            out.append(term)
    return out


def merge_trait(name: str, base: Any, extra: Any) -> list:
    """The merged value of list trait ``name``."""
    if name == "node_affinity_required":
        return and_node_selector_terms(base, extra)
    if name in ("volumes", "volume_mounts", "init_containers", "extra_containers"):
        if name == "volume_mounts":
            # mounts are unique by mountPath, not name
            out = [copy.deepcopy(x) for x in as_list(base)]
            for m in as_list(extra):
                path = m.get("mountPath") if isinstance(m, Mapping) else None
                out = [x for x in out if not (isinstance(x, Mapping) and path and x.get("mountPath") == path)]
                out.append(copy.deepcopy(m))
            return out
        return extend_by_name(base, extra)
    return extend_unique(base, extra)
