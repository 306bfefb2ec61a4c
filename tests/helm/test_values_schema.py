"""helm-values/values.yaml (and each overlay) validated the way helm validates them.

helm coalesces the chart's defaults with every values file, then checks the
result against the chart's values.schema.json. These tests do the same with the
zero-to-jupyterhub chart's own defaults and schema (../shared/z2jh/), then
check what hubml relies on survives the merge: the spawner class, the culler
swap, an empty profileList, complete gpu_profiles lists, least scopes.
"""

from __future__ import annotations

import copy
from urllib.parse import urlparse

import jsonschema
import pytest

from hubml_testing.helm_values import (
    OVERLAYS,
    helm_merge,
    hub_services_and_roles,
    load_yaml,
    merged_values,
    overlay_path,
    role_for_service,
    user_values,
    z2jh_chart_files,
)

CASES = [(), *[(name,) for name in OVERLAYS]]
IDS = ["values.yaml", *[f"values.yaml+{name}" for name in OVERLAYS]]


def schema_errors(values: dict) -> list[str]:
    _, schema = z2jh_chart_files()
    validator = jsonschema.Draft7Validator(schema)
    return sorted(
        f"{'.'.join(str(p) for p in err.absolute_path) or '(top)'}: {err.message}"
        for err in validator.iter_errors(values)
    )


@pytest.mark.parametrize("overlays", CASES, ids=IDS)
def test_values_pass_the_chart_schema(overlays):
    errors = schema_errors(merged_values(*overlays))
    assert errors == [], "values rejected by the zero-to-jupyterhub schema:\n" + "\n".join(errors)


# Mistakes an admin makes in a values file; each must be caught by the same check.
BAD_VALUES = {
    "misspelt hub key": ({"hub": {"servics": {}}}, "hub"),
    "cull.enabled as a string": ({"cull": {"enabled": "no"}}, "cull.enabled"),
    "services as a list": ({"hub": {"services": [{"name": "hubml"}]}}, "hub.services"),
    "profileList as a map": ({"singleuser": {"profileList": {"cpu": {}}}}, "singleuser.profileList"),
    "lower-case class in hub.config": ({"hub": {"config": {"hubmlSpawner": {"gpu_profiles": []}}}}, "hub.config"),
    "unknown top-level key": ({"hubml": {"enabled": True}}, "(top)"),
    "image tag as a number": ({"singleuser": {"image": {"tag": 1.0}}}, "singleuser.image.tag"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES), ids=sorted(BAD_VALUES))
def test_schema_check_rejects_bad_values(case):
    override, where = BAD_VALUES[case]
    values = helm_merge(merged_values(), override)
    errors = schema_errors(values)
    assert any(e.startswith(where + ":") for e in errors), f"{case}: expected an error at {where}, got {errors}"


@pytest.mark.parametrize("overlays", CASES, ids=IDS)
def test_hubml_settings_survive_the_merge(overlays):
    values = merged_values(*overlays)
    hub = values["hub"]
    assert hub["config"]["JupyterHub"]["spawner_class"] == "hubml"
    assert values["cull"]["enabled"] is False, "z2jh's own culler must be off: hubml-culler replaces it"
    assert values["singleuser"]["profileList"] == [], (
        "singleuser.profileList must stay empty: a non-empty list would replace HubMLSpawner's gpu_profiles"
    )
    profiles = hub["config"]["HubMLSpawner"]["gpu_profiles"]
    names = [p["name"] for p in profiles]
    assert len(names) == len(set(names)), f"duplicate profile names: {names}"
    assert sum(1 for p in profiles if p.get("default")) == 1, "exactly one default profile"
    services, _ = hub_services_and_roles(values)
    assert {s["name"] for s in services} == {"hubml-culler", "hubml"}


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_overlay_carries_a_complete_profile_list(name):
    """helm replaces lists: an overlay with only its GPU entries would drop the CPU default."""
    own = load_yaml(overlay_path(name))["hub"]["config"]["HubMLSpawner"]["gpu_profiles"]
    merged = merged_values(name)["hub"]["config"]["HubMLSpawner"]["gpu_profiles"]
    assert merged == own
    assert any(p.get("default") for p in own), f"{name}.yaml must include the default (CPU) profile"
    assert any("gpu" in p for p in own), f"{name}.yaml must define at least one GPU profile"


def test_overlay_gpu_kinds_match_their_names():
    kinds = {
        name: [p["gpu"] for p in user_values(name)["hub"]["config"]["HubMLSpawner"]["gpu_profiles"] if "gpu" in p]
        for name in OVERLAYS
    }
    assert all("mig" not in g and not g.get("shared") for g in kinds["full-gpu"])
    assert all("mig" in g for g in kinds["mig"])
    assert all(g.get("shared") for g in kinds["time-sliced"])


# Scopes no hubml service may hold: each would let it act as an admin or as any user.
TOO_BROAD = {
    "admin:users", "admin:servers", "admin:groups", "admin:services", "admin-ui", "tokens", "users",
    "servers", "groups", "inherit", "shutdown", "proxy", "access:services", "read:users", "users:activity",
}


@pytest.mark.parametrize("service", ["hubml-culler", "hubml"])
def test_services_hold_no_broad_scopes(service):
    values = merged_values()
    scopes = role_for_service(values, service)
    assert scopes, f"no role grants {service} any scope"
    assert not TOO_BROAD & set(scopes), f"{service} holds broad scopes {sorted(TOO_BROAD & set(scopes))}"
    services, _ = hub_services_and_roles(values)
    entry = next(s for s in services if s["name"] == service)
    assert not entry.get("admin"), f"{service} must not be an admin service"


def test_notebook_and_user_roles_are_filtered_to_their_owner():
    _, roles = hub_services_and_roles(merged_values())
    by_name = {r["name"]: r for r in roles}
    custom = set(merged_values()["hub"]["config"]["JupyterHub"]["custom_scopes"])
    for name in ("user", "server"):
        scopes = by_name[name]["scopes"]
        for scope in scopes:
            base = scope.split("!", 1)[0]
            if base.startswith("custom:"):
                assert base in custom, f"role {name} uses undefined custom scope {base}"
                assert scope.endswith("!user"), f"role {name}: {scope} must be filtered to the owner (!user)"
    assert "self" in by_name["user"]["scopes"], "the redefined user role must keep `self`"
    # the custom scopes are the ones hubml's service checks, each granted to users and notebook tokens
    from hubml.hub_ext.handlers import ALL_SCOPES

    assert custom == set(ALL_SCOPES), f"values define {sorted(custom)}, hub_ext checks {sorted(ALL_SCOPES)}"
    for name in ("user", "server"):
        assert {s.split("!", 1)[0] for s in by_name[name]["scopes"] if s.startswith("custom:")} == custom
    server = set(by_name["server"]["scopes"])
    assert {"users:activity!user", "access:servers!server"} <= server, "JupyterHub's default server scopes"
    assert not server & TOO_BROAD
    # users open the culler's notices page (README: "The GPU-aware culler"); nothing else needs access:services
    services_access = {s for s in server | set(by_name["user"]["scopes"]) if s.startswith("access:services")}
    assert services_access == {"access:services!service=hubml-culler"}, services_access
    assert "access:services!service=hubml-culler" in by_name["user"]["scopes"]


def test_names_shared_with_the_extras_chart_agree():
    """values.yaml points at objects the hubml-extras chart creates; the names must match."""
    from hubml_testing.helm_values import EXTRAS_CHART

    values = merged_values()
    extras = load_yaml(EXTRAS_CHART / "values.yaml")
    url = urlparse(values["hub"]["services"]["hubml"]["url"])
    assert url.hostname == extras["hubExt"]["name"]
    assert url.port == extras["hubExt"]["port"]
    egress_labels = [
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for rule in values["singleuser"]["networkPolicy"]["egress"]
        for peer in rule["to"]
    ]
    assert extras["hubExt"]["name"] in egress_labels
    assert extras["mlflow"]["name"] in egress_labels
    env = values["singleuser"]["extraEnv"]
    assert urlparse(env["MLFLOW_TRACKING_URI"]).hostname == extras["mlflow"]["name"]
    assert urlparse(env["MLFLOW_TRACKING_URI"]).port == extras["mlflow"]["port"]
    assert extras["jupyterhub"]["serviceKey"] == "hubml"


def test_helm_merge_follows_helm_rules():
    """The merge used above must behave like helm's: maps merge, lists replace, null deletes."""
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    out = helm_merge(base, {"a": {"y": [3]}, "b": None})
    assert out == {"a": {"x": 1, "y": [3]}}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2}, "the defaults must not be modified"
    assert copy.deepcopy(out) == out
