"""Namespace ResourceQuota, read and explained before a spawn would exceed it (pure).

Without this, a pod over quota is rejected by the API server with
``403 Forbidden: exceeded quota: team-quota, requested: requests.nvidia.com/gpu=1,
used: …`` buried in the hub log after KubeSpawner's retries.  We compare first and
say which quota, which resource, how much is used and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}
_Q_RE = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|K|M|G|T|P|E)?$")


def parse_quantity(q: Any) -> Decimal:
    """A Kubernetes resource.Quantity (``500m``, ``16Gi``, ``4``) as a Decimal."""
    if isinstance(q, (int, float, Decimal)) and not isinstance(q, bool):
        return Decimal(str(q))
    m = _Q_RE.match(str(q).strip())
    if not m:
        raise ValueError(f"{q!r} is not a Kubernetes quantity")
    try:
        return Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2) or ""])
    except InvalidOperation as e:
        raise ValueError(f"{q!r} is not a Kubernetes quantity") from e


def pod_quota_usage(requests: Mapping[str, Any], limits: Mapping[str, Any]) -> dict[str, Decimal]:
    """Quota keys one pod consumes (``pods``, ``requests.cpu``, ``cpu``, ``limits.memory``,
    ``requests.nvidia.com/gpu``…)."""
    out: dict[str, Decimal] = {"pods": Decimal(1), "count/pods": Decimal(1)}
    for k, v in requests.items():
        if v is None:
            continue
        q = parse_quantity(v)
        out[f"requests.{k}"] = q
        if k in ("cpu", "memory", "ephemeral-storage"):
            out[k] = q
    for k, v in limits.items():
        if v is None:
            continue
        out[f"limits.{k}"] = parse_quantity(v)
    return out


def _fmt(key: str, q: Decimal) -> str:
    if "memory" in key or "storage" in key:
        gib = q / Decimal(2**30)
        return f"{gib.normalize():f} GiB" if gib >= 1 else f"{(q / 2**20).normalize():f} MiB"
    return f"{q.normalize():f}"


def quota_problems(quotas: Iterable[Mapping[str, Any]], usage: Mapping[str, Decimal]) -> list[str]:
    """One sentence per quota/resource the new pod would exceed."""
    problems = []
    for rq in quotas:
        name = (rq.get("metadata") or {}).get("name", "?")
        status = rq.get("status") or {}
        hard = status.get("hard") or (rq.get("spec") or {}).get("hard") or {}
        used = status.get("used") or {}
        for key, limit in hard.items():
            if key not in usage:
                continue
            try:
                lim, cur = parse_quantity(limit), parse_quantity(used.get(key, 0))
            except ValueError:
                continue
            want = usage[key]
            if cur + want > lim:
                problems.append(
                    f"quota {name!r} allows {key} {_fmt(key, lim)}, {_fmt(key, cur)} already in use, "
                    f"this server needs {_fmt(key, want)}"
                )
    return problems


def explain(namespace: str, problems: list[str]) -> str:
    return (
        f"This server would exceed the resource quota of namespace {namespace!r}: "
        + "; ".join(problems)
        + ". Stop another server in this namespace, pick a smaller profile, or ask a hub admin to raise the quota."
    )
