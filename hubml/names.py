"""Validation of the names and values that travel from a notebook to processes,
MLflow and Kubernetes objects.

One set of rules for both backends: a name that works locally must also be a
valid Kubernetes object name, so moving a notebook into a hub never breaks it.
"""

from __future__ import annotations

import re

from hubml.errors import InvalidRequest

# RFC 1123 label, the strictest name Kubernetes applies (Services, label values).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# MLflow accepts almost anything as a registered model name; we keep to what is
# also safe in URLs, file paths and labels.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$")
# Kubernetes label values and qualified names (keys of labels, annotations, node
# selectors, taints, resources): an optional DNS-subdomain prefix and '/', then a name.
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
# A container image reference as the container runtimes parse it, loosely: what
# the registry would refuse anyway is left to it, what could smuggle shell or YAML is not.
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._\-/:@]*[A-Za-z0-9_]$|^[a-z0-9]$", re.IGNORECASE)
MAX_IMAGE_LENGTH = 512
MAX_QUALIFIED_NAME_LENGTH = 317  # 253 of prefix, '/', 63 of name

#: Variables the launcher or hubml sets for every worker; a user value would
#: silently break the rendezvous or the tracking, so they are refused.
RESERVED_ENV = frozenset({
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
    "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "HUBML_JOB_ID",
    # which GPUs a container sees: the device plugin's for GPU profiles, "void" for
    # the rest (hubml.pod_resources); a user's value would expose the node's GPUs
    "NVIDIA_VISIBLE_DEVICES",
})


def dns_label(value: str, what: str) -> str:
    """Return ``value`` if it is a valid lowercase DNS label, else explain the rule."""
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        raise InvalidRequest(
            f"{what} {value!r} is not a valid name: use 1 to 63 lowercase letters, digits "
            f"and '-', starting and ending with a letter or digit (for example 'iris-clf')."
        )
    return value


def model_name(value: str) -> str:
    if not isinstance(value, str) or not _MODEL_NAME.match(value):
        raise InvalidRequest(
            f"Model name {value!r} is not allowed: use 1 to 63 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit (for example 'iris-clf')."
        )
    return value


def alias(value: str) -> str:
    if not isinstance(value, str) or not _ALIAS.match(value) or value.lower() == "latest":
        raise InvalidRequest(
            f"Alias {value!r} is not allowed: use a letter or '_' followed by letters, digits, "
            f"'_' or '-' (for example 'champion'); 'latest' is reserved by MLflow."
        )
    return value


def env_pair(item: str) -> tuple[str, str]:
    """Parse one ``KEY=VALUE`` from ``--env``; refuse names the launcher owns."""
    key, sep, value = item.partition("=")
    if not sep:
        raise InvalidRequest(
            f"--env expects KEY=VALUE, got {item!r}. Example: --env LR=0.01 (repeat --env for more)."
        )
    if not _ENV_NAME.match(key):
        raise InvalidRequest(
            f"--env name {key!r} is not a valid environment variable name: use letters, digits "
            f"and '_', not starting with a digit."
        )
    if key in RESERVED_ENV:
        raise InvalidRequest(
            f"--env {key} is set by hubml or by torch.distributed.run for every worker and cannot "
            f"be overridden; choose another name."
        )
    if "\x00" in value:
        raise InvalidRequest(f"--env {key} contains a NUL character, which no process can receive.")
    return key, value


def env_pairs(items: list[str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or []:
        key, value = env_pair(item)
        if key in result and result[key] != value:
            raise InvalidRequest(f"--env {key} is given twice with different values; keep one.")
        result[key] = value
    return result


def _prefixed(what: str, text: str) -> str:
    return f"{what}: {text}" if what else text


def image_reference(value: object, what: str = "Image") -> str:
    """Return ``value`` if it reads as a container image reference, else explain.

    The one image rule for the catalogue, the spawner and the hub service, so an
    image accepted when the profiles load is never refused when a job is planned.
    """
    if not isinstance(value, str) or len(value) > MAX_IMAGE_LENGTH or not _IMAGE.match(value):
        raise InvalidRequest(
            f"{what + ' ' if what else ''}{value!r} is not an image reference such as "
            f"'quay.io/jupyter/pytorch-notebook:2025-01-06'."
        )
    return value


def qualified_name(value: object, what: str = "", kind: str = "label key") -> str:
    """Return ``value`` if it is a Kubernetes qualified name (label, annotation, taint or resource key)."""
    if not isinstance(value, str) or len(value) > MAX_QUALIFIED_NAME_LENGTH or not _QUALIFIED_NAME.match(value):
        raise InvalidRequest(_prefixed(
            what, f"{value!r} is not a valid {kind} (an optional DNS prefix and '/', then at most 63 "
            "letters, digits, '-', '_' or '.', starting and ending alphanumeric)."))
    return value


def label_value(value: object, key: object = None, what: str = "") -> str:
    """Return ``value`` if it is a valid Kubernetes label value (what selectors and labels carry)."""
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
        of = f" of {key!r}" if key is not None else ""
        raise InvalidRequest(_prefixed(
            what, f"value {value!r}{of} is not a valid label value (a string of at most 63 letters, "
            "digits, '-', '_' or '.', starting and ending alphanumeric)."))
    return value


def labels(mapping: object, what: str = "labels") -> dict[str, str]:
    """Check a label (or node selector) mapping; the first bad key or value is the error."""
    if not isinstance(mapping, dict):
        raise InvalidRequest(_prefixed(what, "must be a mapping of label keys to values."))
    for key, value in mapping.items():
        qualified_name(key, what)
        label_value(value, key, what)
    return mapping


def annotations(mapping: object, what: str = "annotations") -> dict[str, str]:
    """Check an annotation mapping: qualified keys, string values of any length."""
    if not isinstance(mapping, dict):
        raise InvalidRequest(_prefixed(what, "must be a mapping of annotation names to values."))
    for key, value in mapping.items():
        qualified_name(key, what, kind="annotation name")
        if not isinstance(value, str):
            raise InvalidRequest(_prefixed(what, f"the value of {key} must be a string."))
    return mapping
