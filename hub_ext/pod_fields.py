"""The container fields training workers and model servers share (pure).

Resource and env checks, the hardened security context and node placement:
every value here ends up in an object that runs code in the cluster, so each
plan's ``validate`` checks them field by field before a manifest is built.
"""

from __future__ import annotations

import re
from typing import Any

from hubml import names
from hubml.errors import InvalidRequest

QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def check_resources(resources: Any) -> None:
    """A container's ``resources``: qualified names to quantities, nothing else to reach the pod."""
    if not isinstance(resources, dict) or set(resources) - {"requests", "limits"}:
        raise InvalidRequest("resources must be {'requests': {...}, 'limits': {...}}.")
    for part in resources.values():
        if not isinstance(part, dict):
            raise InvalidRequest("resources.requests/limits must be mappings of resource names to quantities.")
        for key, value in part.items():
            names.qualified_name(key, "resources", kind="resource name")
            if not isinstance(value, str) or not QUANTITY_RE.match(value):
                raise InvalidRequest(f"resources: {key}={value!r} is not a Kubernetes quantity such as '2', '500m', '16Gi'.")


def check_env(env: Any) -> None:
    """The user's env for a container: the same names ``--env`` accepts (none the launcher owns)."""
    if not isinstance(env, dict):
        raise InvalidRequest("env must be a mapping of names to values.")
    for key, value in env.items():
        if not isinstance(value, str):
            raise InvalidRequest(f"env {key}: the value must be a string.")
        names.env_pair(f"{key}={value}")


def security_context() -> dict[str, Any]:
    """What user code in hubml's pods never needs: privilege escalation, capabilities, unconfined syscalls."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def placement(node_selector: dict[str, str], node_affinity: list[dict[str, Any]],
              tolerations: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod spec fields that place a pod: the profile's node selector, GPU affinity, tolerations."""
    spec: dict[str, Any] = {}
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if node_affinity:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [dict(e) for e in node_affinity]}]}}}
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    return spec

