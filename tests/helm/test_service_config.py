"""The configuration values.yaml hands to hubml's own code is accepted by that code.

traitlets silently ignores a config section for a class that does not exist
and z2jh cannot check Python settings, so a misspelt class or trait in the
values would only show as "the setting does nothing" on a live cluster. Here
the culler's config file and every overlay's gpu_profiles go through the same
loaders the hub pod uses.
"""

from __future__ import annotations

import json

import pytest

from hubml_testing.helm_values import OVERLAYS, helm_merge, merged_values

CASES = [(), *[(name,) for name in OVERLAYS]]
IDS = ["values.yaml", *[f"values.yaml+{name}" for name in OVERLAYS]]


def culler_config_file(values: dict) -> tuple[str, dict]:
    files = values["hub"]["extraFiles"]
    entry = files["hubml-culler-config"]
    command = values["hub"]["services"]["hubml-culler"]["command"]
    assert f"--config={entry['mountPath']}" in command, (
        "the culler's command must load the config file that hub.extraFiles mounts"
    )
    assert entry["mountPath"].endswith(".json"), "z2jh renders `data` as JSON only for a .json file name"
    return entry["mountPath"], entry["data"]


def unknown_culler_keys(data: dict) -> list[str]:
    """Config sections / traits in the culler's config that CullerApp does not have."""
    from hubml.culler.app import CullerApp

    traits = CullerApp.class_traits(config=True)
    bad = [f"section {k}" for k in data if k != "CullerApp"]
    bad += [f"CullerApp.{k}" for k in data.get("CullerApp", {}) if k not in traits]
    return sorted(bad)


def run_profiles_hand_off(values: dict, culler_data: dict, tmp_path) -> str:
    """Run hub.extraConfig's snippet as z2jh does (exec with `c`, after hub.config),
    writing to a temp file instead of the pod's path; returns that file."""
    from traitlets.config import Config

    snippet = values["hub"]["extraConfig"]["hubml-culler-profiles"]
    pod_path = culler_data["CullerApp"]["spawner_profiles"]
    assert pod_path in snippet, "the snippet must write the file the culler's spawner_profiles names"
    target = str(tmp_path / "gpu_profiles.json")
    c = Config()
    for cls, traits in values["hub"]["config"].items():
        c[cls].update(traits)
    exec(snippet.replace(pod_path, target), {"c": c})  # noqa: S102 - the values' own config code
    return target


@pytest.mark.parametrize("overlays", CASES, ids=IDS)
def test_culler_config_names_real_traits(overlays, tmp_path, monkeypatch):
    from hubml.culler.app import CullerApp
    from hubml.quantities import parse_duration

    values = merged_values(*overlays)
    _, data = culler_config_file(values)
    assert unknown_culler_keys(data) == [], "values.yaml configures what the culler does not have"

    data = json.loads(json.dumps(data))
    data["CullerApp"]["spawner_profiles"] = run_profiles_hand_off(values, data, tmp_path)
    path = tmp_path / "culler_config.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://hub:8081/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "not-used")
    app = CullerApp()
    app.initialize([f"--config={path}"])
    for key, value in data["CullerApp"].items():
        assert getattr(app, key) == value, f"CullerApp.{key} did not take the value from values.yaml"
    culler = app.build()  # validates URLs, durations, the profile catalogue
    culler.hub.close()
    # each profile's idle_timeout reached the culler's policy (default timeout otherwise)
    policies = app.policy_config().profiles
    for profile in values["hub"]["config"]["HubMLSpawner"]["gpu_profiles"]:
        expected = parse_duration(profile["idle_timeout"]) if "idle_timeout" in profile else data["CullerApp"]["timeout"]
        assert policies[profile["name"]].idle_timeout == expected, profile["name"]


def test_culler_config_rejects_a_misspelt_trait(tmp_path, monkeypatch):
    """The check above can fail: a wrong key is not a CullerApp trait."""
    values = helm_merge(merged_values(), {"hub": {"extraFiles": {"hubml-culler-config": {"data": {
        "CullerApp": {"timout": 60}, "HubMLCuller": {"timeout": 60}}}}}})
    _, data = culler_config_file(values)
    assert unknown_culler_keys(data) == ["CullerApp.timout", "section HubMLCuller"]


@pytest.mark.parametrize("overlays", CASES, ids=IDS)
def test_gpu_profiles_pass_the_spawner_validation(overlays):
    from hubml.spawner.spawner import check_gpu_profiles

    profiles = merged_values(*overlays)["hub"]["config"]["HubMLSpawner"]["gpu_profiles"]
    catalogue = check_gpu_profiles(profiles)
    assert catalogue is not None


def test_spawner_validation_catches_a_wrong_mig_slice():
    """1g.5gb is an A100 40GB slice: an 80GB profile naming it must be refused at hub start."""
    from hubml.spawner.spawner import check_gpu_profiles

    profiles = merged_values("mig")["hub"]["config"]["HubMLSpawner"]["gpu_profiles"]
    bad = [dict(p) for p in profiles]
    bad[1] = {**bad[1], "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.5gb"}}
    with pytest.raises(ValueError) as err:
        check_gpu_profiles(bad)
    assert "1g.5gb" in str(err.value)
