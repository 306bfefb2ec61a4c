"""Where KServe fetches a registered model from: the registry's artifact URI, made readable (pure, no I/O).

Why: KServe's storage initializer downloads ``storageUri`` into
``/mnt/models`` before the server starts, and it reads only object stores and
volumes (``s3://``, ``gs://``, ``https://`` incl. Azure Blob, ``pvc://``,
``hdfs://``, ``webhdfs://``, ``oci://``, ``hf://``). The MLflow registry
answers with *its* view of the files: ``mlflow-artifacts:/…`` (proxied by the
tracking server), ``file:///…`` (a path on the tracking server's disk) or
``models:/``/``runs:/`` (registry indirections), none of which KServe can
read (kserve #4251, #3555). The administrator knows what those locations
are in storage terms (the tracking server's ``--artifacts-destination``, the
volume its directory lives on) and says so once in
``HubMLService.kserve_storage_uri_map``; a model whose location is still
unreadable is refused before anything is created.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from hubml.errors import InvalidRequest

#: Schemes KServe's storage initializer downloads from.
READABLE_SCHEMES = ("s3", "gs", "https", "http", "pvc", "hdfs", "webhdfs", "oci", "hf")
#: Schemes the MLflow registry answers with that only MLflow itself can read.
MLFLOW_ONLY_SCHEMES = ("mlflow-artifacts", "file", "models", "runs", "dbfs")

_READABLE = re.compile(r"^(%s)://[^\s;|&$`'\"\\]+$" % "|".join(READABLE_SCHEMES))


def is_readable(uri: str) -> bool:
    """Whether KServe's storage initializer can download ``uri`` as it is."""
    return isinstance(uri, str) and bool(_READABLE.match(uri))


def check_map(mapping: Mapping[str, str]) -> dict[str, str]:
    """Validate ``kserve_storage_uri_map`` at start-up: non-empty prefixes onto readable locations."""
    out: dict[str, str] = {}
    for prefix, target in mapping.items():
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"kserve_storage_uri_map key {prefix!r} must be a non-empty URI prefix without spaces, "
                             f"e.g. 'mlflow-artifacts:/'.")
        if not isinstance(target, str) or not is_readable(target + "x"):
            raise ValueError(
                f"kserve_storage_uri_map[{prefix!r}] = {target!r} is not a location KServe's storage initializer "
                f"reads; it must start with one of {', '.join(s + '://' for s in READABLE_SCHEMES)}, e.g. "
                f"'s3://mlflow-artifacts/' (the tracking server's --artifacts-destination) or "
                f"'pvc://mlflow-artifacts/' (the volume holding its artifact directory)."
            )
        out[prefix] = target
    return out


def for_kserve(uri: str, mapping: Mapping[str, str], *, model: str) -> str:
    """The ``storageUri`` of a model version at ``uri`` (the registry's answer), or a clear refusal.

    The longest matching prefix of ``mapping`` is replaced; a URI that is
    readable already passes unchanged.
    """
    for prefix in sorted(mapping, key=len, reverse=True):
        if uri.startswith(prefix):
            uri = mapping[prefix] + uri[len(prefix):]
            break
    if is_readable(uri):
        return uri
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    why = (f"'{scheme}:' locations are readable only through MLflow" if scheme in MLFLOW_ONLY_SCHEMES
           else "that is not a location it can download from")
    raise InvalidRequest(
        f"KServe cannot fetch {model}: the registry stores it at {uri!r}, and {why}. Ask the hub administrator "
        f"to map that location to the object store or volume behind it (HubMLService.kserve_storage_uri_map, "
        f"e.g. {{'mlflow-artifacts:/': 's3://BUCKET/'}} for a tracking server with --artifacts-destination "
        f"s3://BUCKET/), or to serve with serving_flavour = 'deployment'. Nothing was deployed."
    )
