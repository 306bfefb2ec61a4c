"""Who owns what in the cluster: the labels and annotations on every object hubml makes.

Every object carries ``hubml.io/user`` (label-safe slug of the hub user),
``hubml.io/kind`` and ``hubml.io/job`` / ``hubml.io/deployment``, and the raw
user name in the ``hubml.io/username`` annotation, so the cluster alone says
who owns what: a restart of the hub or the service loses nothing. Kept apart
from the builders because listing, ownership checks and the deployment URLs
read these names too (pure: no I/O).
"""

from __future__ import annotations

import json

from typing import Any

from kubespawner.slugs import is_valid_label, safe_slug

from hubml.errors import InvalidRequest

LABEL_USER = "hubml.io/user"


LABEL_KIND = "hubml.io/kind"


LABEL_JOB = "hubml.io/job"


LABEL_DEPLOYMENT = "hubml.io/deployment"


LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"


ANNOTATION_USERNAME = "hubml.io/username"


ANNOTATION_SPEC = "hubml.io/spec"


ANNOTATION_CANCELLED = "hubml.io/cancelled"


KIND_TRAINING = "training"


KIND_SERVING = "serving"


MANAGED_BY = "hubml"


#: Label the Job controller puts on every pod of an Indexed Job (Kubernetes >= 1.28).
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def user_slug(username: str) -> str:
    """Label-safe form of a hub user name (KubeSpawner's ``safe_slug``, so both agree).

    Names that are already valid label values are kept as they are; anything else
    (``a@b.org``) becomes a stripped prefix plus a hash, which cannot collide.
    """
    if not isinstance(username, str) or not username:
        raise InvalidRequest("The hub user name is empty; the hub did not identify the caller.")
    return safe_slug(username, is_valid=is_valid_label, max_length=63)


def owner_labels(username: str, kind: str) -> dict[str, str]:
    return {LABEL_USER: user_slug(username), LABEL_KIND: kind, LABEL_MANAGED_BY: MANAGED_BY}


def owned_by(obj: dict[str, Any], username: str) -> bool:
    """Whether a Kubernetes object (dict) belongs to ``username``.

    Both the label (used for listing) and the raw-name annotation (exact) must
    match, so a hashed slug can never let one user pass for another.
    """
    meta = obj.get("metadata") or {}
    return ((meta.get("labels") or {}).get(LABEL_USER) == user_slug(username)
            and (meta.get("annotations") or {}).get(ANNOTATION_USERNAME) == username)


def metadata(name: str, namespace: str, labels: dict[str, str], annotations: dict[str, str] | None = None,
          owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    if owner:
        meta["ownerReferences"] = [owner]
    return meta


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    """An ownerReference to ``obj`` (as returned by the API server) so the garbage
    collector deletes the dependants with it: cancel or TTL cleans everything."""
    meta = obj["metadata"]
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": False, "blockOwnerDeletion": False}


def spec_record(obj: dict[str, Any]) -> dict[str, Any]:
    """The request hubml recorded on an object (``hubml.io/spec``); ``{}`` when absent or unreadable."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC, "{}")
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
