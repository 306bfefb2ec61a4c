"""Per-profile cull settings: ``{profile: {idle_timeout, max_age, gpu}}``.

Sources, later ones overriding earlier ones per profile:

1. the spawner's profile list (the ``c.HubMLSpawner.gpu_profiles`` entries in a
   JSON/YAML file), validated by ``hubml.profile_config``: each profile's
   ``idle_timeout`` and GPU count;
2. the culler's ``profiles`` setting: a JSON/YAML file path or inline JSON.

Everything is validated up front so a typo fails at start-up with a message
naming the profile and field, not at 3 a.m. in a pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hubml.quantities import parse_duration

from .policy import ProfilePolicy

ALLOWED_KEYS = {"idle_timeout", "max_age", "gpu"}


class CatalogueError(ValueError):
    pass


def _gpu_count(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return 1 if value else 0
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, Mapping) and isinstance(value.get("count"), int) and value["count"] >= 0:
        return value["count"]
    raise CatalogueError(
        f"{where}: 'gpu' must be a GPU count (integer >= 0), true/false, or "
        f"{{'count': N}}, not {value!r}"
    )


def parse_profiles(data: Any, default: ProfilePolicy, source: str) -> dict[str, ProfilePolicy]:
    """Validate ``{profile: {idle_timeout, max_age, gpu}}`` into policies."""
    if not isinstance(data, Mapping):
        raise CatalogueError(
            f"{source}: profiles must be a mapping of profile name to "
            "{idle_timeout, max_age, gpu}, e.g. {\"a100\": {\"idle_timeout\": \"30m\", \"gpu\": 1}}"
        )
    out: dict[str, ProfilePolicy] = {}
    for name, spec in data.items():
        where = f"{source}: profile {name!r}"
        if not isinstance(name, str) or not name:
            raise CatalogueError(f"{source}: profile names must be non-empty strings, not {name!r}")
        if not isinstance(spec, Mapping):
            raise CatalogueError(f"{where} must be a mapping with idle_timeout/max_age/gpu, not {spec!r}")
        unknown = set(spec) - ALLOWED_KEYS
        if unknown:
            raise CatalogueError(
                f"{where} has unknown keys {sorted(unknown)}; allowed are {sorted(ALLOWED_KEYS)}"
            )
        try:
            idle = parse_duration(spec.get("idle_timeout", default.idle_timeout), "idle_timeout")
            # max_age 0 (or absent) means no limit, as the culler's own max_age setting
            max_age = parse_duration(spec.get("max_age", default.max_age) or 0, "max_age", allow_zero=True)
        except ValueError as e:
            raise CatalogueError(f"{where}: {e}") from None
        out[name] = ProfilePolicy(idle_timeout=idle, max_age=max_age, gpus=_gpu_count(spec.get("gpu", 0), where))
    return out


def load_profiles_setting(value: str, default: ProfilePolicy) -> dict[str, ProfilePolicy]:
    """``value`` is inline JSON (starts with ``{``) or a path to a JSON/YAML file."""
    text = value.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise CatalogueError(f"profiles: inline JSON does not parse ({e})") from None
        return parse_profiles(data, default, "profiles (inline JSON)")
    path = Path(text)
    if not path.is_file():
        raise CatalogueError(
            f"profiles: {text!r} is neither inline JSON (starting with '{{') nor an "
            "existing file; give a JSON/YAML file path or a JSON object"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CatalogueError(f"profiles file {path}: cannot read it ({e})") from None
    return parse_profiles(data, default, f"profiles file {path}")


def from_spawner_catalogue(path: str, default: ProfilePolicy) -> dict[str, ProfilePolicy]:
    """Policies from the spawner's profile list (``c.HubMLSpawner.gpu_profiles``).

    ``path`` is a JSON/YAML file holding that same list; it is validated by
    :func:`hubml.profile_config.load_catalogue`, so the culler and the spawner agree
    on names. Each profile's ``idle_timeout`` (None: the culler's default) and
    GPU units become its cull policy.
    """
    if not path:
        return {}
    from hubml.profile_config import load_catalogue
    from hubml.profiles import ProfileConfigError

    p = Path(path)
    if not p.is_file():
        raise CatalogueError(
            f"spawner_profiles: {path!r} is not a file; give the JSON/YAML file holding "
            "the list passed to c.HubMLSpawner.gpu_profiles"
        )
    try:
        entries = yaml.safe_load(p.read_text())
        catalogue = load_catalogue(entries, source=str(p))
    except (OSError, yaml.YAMLError) as e:
        raise CatalogueError(f"spawner_profiles {p}: cannot read it ({e})") from None
    except ProfileConfigError as e:
        raise CatalogueError(f"spawner_profiles {p}: {e}") from None
    out: dict[str, ProfilePolicy] = {}
    for prof in catalogue:
        idle = prof.idle_timeout_seconds or default.idle_timeout
        out[prof.name] = ProfilePolicy(idle_timeout=float(idle), max_age=default.max_age, gpus=prof.gpu_units)
    return out
