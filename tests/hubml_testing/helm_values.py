"""hubml's helm values as the zero-to-jupyterhub chart sees them (no fixtures here).

Why this module: helm-values/values.yaml is the ONE place that says which hub
services hubml runs and which scopes they hold. Tests that start a real hub
with "exactly the scopes the values grant" read them through these helpers, so
a change to values.yaml is what the tests exercise.

- ``z2jh_chart_files()``: the chart's defaults and schema from ``../shared/z2jh/``
  (never copied into the repo); fails the test with a clear message if absent.
- ``helm_merge(defaults, override)``: helm's value coalescing (maps merge key by
  key, lists and scalars are replaced, ``null`` deletes a key).
- ``merged_values(*overlays)``: chart defaults + helm-values/values.yaml + overlays.
- ``hub_services_and_roles(values)``: what z2jh's jupyterhub_config.py turns
  ``hub.services`` / ``hub.loadRoles`` / ``cull.enabled`` into.
- ``helm_binary()`` / ``run_helm(...)``: the helm built by dev/kube/build.sh.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
HELM_VALUES = REPO_ROOT / "helm-values"
VALUES_FILE = HELM_VALUES / "values.yaml"
EXAMPLES_DIR = HELM_VALUES / "examples"
EXTRAS_CHART = HELM_VALUES / "hubml-extras"
Z2JH_DIR = REPO_ROOT.parent / "shared" / "z2jh"
OVERLAYS = ("full-gpu", "mig", "time-sliced")


def load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def z2jh_chart_files() -> tuple[dict, dict]:
    """The zero-to-jupyterhub chart's (defaults, schema), read from ../shared/z2jh/."""
    values = Z2JH_DIR / "values.yaml"
    schema = Z2JH_DIR / "values.schema.yaml"
    missing = [str(p) for p in (values, schema) if not p.is_file()]
    if missing:
        pytest.fail(
            f"The zero-to-jupyterhub chart files are missing: {', '.join(missing)}. "
            "hubml's helm tests validate helm-values/ against the chart's own defaults "
            "(jupyterhub/values.yaml) and schema (jupyterhub/values.schema.yaml); put them "
            f"in {Z2JH_DIR} (next to the repository checkout) and re-run.",
            pytrace=False,
        )
    return load_yaml(values), load_yaml(schema)


def helm_merge(defaults: Any, override: Any) -> Any:
    """Coalesce ``override`` over ``defaults`` the way helm merges values files.

    Maps merge recursively; anything else (lists included) in ``override``
    replaces the default; a ``None`` in ``override`` removes the key.
    """
    if not isinstance(defaults, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    out = copy.deepcopy(defaults)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = helm_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def overlay_path(name: str) -> Path:
    return EXAMPLES_DIR / f"{name}.yaml"


def user_values(*overlays: str) -> dict:
    """helm-values/values.yaml with the named overlays merged over it (no chart defaults)."""
    values = load_yaml(VALUES_FILE) or {}
    for name in overlays:
        values = helm_merge(values, load_yaml(overlay_path(name)) or {})
    return values


def merged_values(*overlays: str) -> dict:
    """Chart defaults + values.yaml + overlays, as the chart's templates receive them."""
    defaults, _ = z2jh_chart_files()
    values = helm_merge(defaults, load_yaml(VALUES_FILE) or {})
    for name in overlays:
        values = helm_merge(values, load_yaml(overlay_path(name)) or {})
    return values


def hub_services_and_roles(values: dict) -> tuple[list[dict], list[dict]]:
    """``(c.JupyterHub.services, c.JupyterHub.load_roles)`` as z2jh's hub config builds them.

    Mirrors jupyterhub/files/hub/jupyterhub_config.py: the idle-culler service
    and role when ``cull.enabled``; then every ``hub.services`` entry (name
    defaulting to its key, ``apiToken`` dropped -- the chart generates tokens)
    and every ``hub.loadRoles`` entry (name defaulting to its key).
    """
    services: list[dict] = []
    roles: list[dict] = []
    if (values.get("cull") or {}).get("enabled"):
        services.append({"name": "jupyterhub-idle-culler", "command": ["python3", "-m", "jupyterhub_idle_culler"]})
        roles.append({
            "name": "jupyterhub-idle-culler",
            "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
            "services": ["jupyterhub-idle-culler"],
        })
    hub = values.get("hub") or {}
    for key, service in (hub.get("services") or {}).items():
        service = copy.deepcopy(service)
        service.setdefault("name", key)
        service.pop("apiToken", None)
        service.pop("api_token", None)
        services.append(service)
    for key, role in (hub.get("loadRoles") or {}).items():
        role = copy.deepcopy(role)
        role.setdefault("name", key)
        roles.append(role)
    return services, roles


def role_for_service(values: dict, service: str) -> list[str]:
    """All scopes that hub.loadRoles grants to ``service`` (union over its roles)."""
    _, roles = hub_services_and_roles(values)
    scopes: list[str] = []
    for role in roles:
        if service in (role.get("services") or []):
            scopes.extend(s for s in role.get("scopes", []) if s not in scopes)
    return scopes


def hub_fixture_config(
    values: dict,
    tokens: dict[str, str],
    *,
    urls: dict[str, str] | None = None,
    extra_services: list[dict] = (),
    extra_roles: list[dict] = (),
) -> dict:
    """``jupyterhub_factory(config=...)`` for exactly the services, roles and custom
    scopes values.yaml defines: each service under its name with a known token
    (and a local URL where given); commands and in-cluster URLs are dropped
    because the tests run the services themselves.
    """
    services, roles = hub_services_and_roles(values)
    entries = []
    for s in services:
        entry = {"name": s["name"], "api_token": tokens[s["name"]]}
        if urls and s["name"] in urls:
            entry["url"] = urls[s["name"]]
        entries.append(entry)
    return {
        "JupyterHub.services": entries + list(extra_services),
        "JupyterHub.load_roles": roles + list(extra_roles),
        "JupyterHub.custom_scopes": values["hub"]["config"]["JupyterHub"].get("custom_scopes", {}),
    }


def role_scopes_for_user(values: dict, role: str, user: str) -> list[str]:
    """A default role's scopes (e.g. ``server``) with ``!user`` filters bound to ``user``."""
    _, roles = hub_services_and_roles(values)
    scopes = next(r["scopes"] for r in roles if r["name"] == role)
    return [s[: -len("!user")] + f"!user={user}" if s.endswith("!user") else s for s in scopes]


# ---- helm ---------------------------------------------------------------------


def kube_version() -> str:
    env = REPO_ROOT / "dev" / "kube" / "versions.env"
    for line in env.read_text().splitlines():
        if line.startswith("KUBE_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"KUBE_VERSION not found in {env}")


def helm_binary() -> Path:
    """helm as built by dev/kube/build.sh; the test FAILS (never skips) when it is missing."""
    cache = Path(os.environ.get("HUBML_KUBE_CACHE", Path.home() / ".cache" / "hubml"))
    helm = cache / f"kube-{kube_version()}" / "bin" / "helm"
    if not os.access(helm, os.X_OK):
        pytest.fail(
            f"helm is not built at {helm}. The chart checks run the real helm (helm.sh/helm/v3, "
            "version pinned in dev/kube/versions.env): run `bash dev/kube/build.sh helm` "
            "(or the whole dev/kube/build.sh) and re-run the tests.",
            pytrace=False,
        )
    return helm


def run_helm(*args: str, check: bool = True, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run helm with a private, throwaway HOME-like environment (no repo config, no network)."""
    helm = helm_binary()
    env = dict(os.environ)
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    env.setdefault("HELM_CACHE_HOME", str(scratch / "hubml-helm-cache"))
    env.setdefault("HELM_CONFIG_HOME", str(scratch / "hubml-helm-config"))
    env.setdefault("HELM_DATA_HOME", str(scratch / "hubml-helm-data"))
    proc = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"`helm {shlex.join(args)}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
