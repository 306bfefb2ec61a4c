"""The pure GPU profile catalogue: parsing, validation corpus, pod/node mapping."""

from __future__ import annotations

import copy

import pytest

from hubml.mig import MIG_CATALOGUE, family_for_model, mig_profiles_for_model
from hubml.profile_config import load_catalogue
from hubml.profiles import ProfileConfigError, UnknownProfileError
from hubml.quantities import parse_memory

EXAMPLE = [
    {"name": "cpu", "display": "CPU · 2 cores · 4 GiB", "cpu": 2, "memory": "4G", "default": True},
    {"name": "a100", "display": "1 × A100 80GB", "gpu": {"model": "A100-SXM4-80GB", "count": 1},
     "cpu": 8, "memory": "64G", "hourly_cost": 4.10, "idle_timeout": "30m", "groups": ["ml-team"]},
    {"name": "mig-small", "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.10gb"}, "cpu": 2, "memory": "16G"},
    {"name": "t4-shared", "gpu": {"model": "Tesla-T4", "shared": True}, "cpu": 2, "memory": "8G"},
]


def test_issue_example_loads_with_expected_mapping():
    cat = load_catalogue(EXAMPLE)
    assert cat.names() == ["cpu", "a100", "mig-small", "t4-shared"]
    assert cat.default.name == "cpu"

    cpu = cat.get("cpu")
    assert cpu.resources() == {}
    assert cpu.tolerations() == []
    assert cpu.memory_bytes == 4 * 1024**3
    assert cpu.gpu_units == 0

    a100 = cat.get("a100")
    assert a100.resources() == {"nvidia.com/gpu": 1}
    assert a100.node_affinity() == [
        {"key": "nvidia.com/gpu.product", "operator": "In",
         "values": ["A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB"]}
    ]
    assert a100.tolerations() == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert a100.pod_labels() == {
        "hubml.io/profile": "a100",
        "hubml.io/gpu-model": "A100-SXM4-80GB",
        "hubml.io/hourly-cost": "4.10",
    }
    assert a100.pod_annotations()["hubml.io/idle-timeout"] == "1800"
    assert a100.idle_timeout_seconds == 1800
    assert a100.groups == ("ml-team",)
    assert a100.allowed_for(["ml-team", "x"]) and not a100.allowed_for(["others"])

    mig = cat.get("mig-small")
    assert mig.resources() == {"nvidia.com/mig-1g.10gb": 1}
    assert mig.node_selector() == {"nvidia.com/mig.strategy": "mixed"}
    assert mig.describe_gpu() == "A100 80GB MIG 1g.10gb"

    t4 = cat.get("t4-shared")
    assert t4.resources() == {"nvidia.com/gpu": 1}
    assert t4.node_affinity()[0]["values"] == ["Tesla-T4-SHARED", "NVIDIA-Tesla-T4-SHARED"]
    assert t4.gpu_units == 1
    assert [p.name for p in cat.allowed_for([])] == ["cpu", "mig-small", "t4-shared"]


def test_mig_single_strategy_uses_gpu_resource_and_product_suffix():
    cat = load_catalogue([{"name": "s", "gpu": {"model": "NVIDIA-A100-SXM4-40GB", "mig": "1g.5gb", "strategy": "single"}}])
    p = cat.get("s")
    assert p.resources() == {"nvidia.com/gpu": 1}
    assert p.node_selector() == {"nvidia.com/mig.strategy": "single"}
    assert p.node_affinity()[0]["values"] == ["A100-SXM4-40GB-MIG-1g.5gb", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"]


def test_unknown_profile_error_lists_names_and_suggests():
    cat = load_catalogue(EXAMPLE)
    with pytest.raises(UnknownProfileError) as e:
        cat.get("a10")
    assert "did you mean 'a100'" in str(e.value)
    assert "cpu, a100, mig-small, t4-shared" in str(e.value)
    with pytest.raises(UnknownProfileError):
        cat.get(None)


@pytest.mark.parametrize(
    "model, family",
    [
        ("A30", "A30-24GB"),
        ("NVIDIA-A100-SXM4-40GB", "A100-40GB"),
        ("A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA-H100-80GB-HBM3", "H100-80GB"),
        ("NVIDIA-H100-NVL", "H100-94GB"),
        ("NVIDIA-H200", "H200-141GB"),
    ],
)
def test_mig_catalogue_resolves_gfd_product_labels(model, family):
    assert family_for_model(model).name == family


def test_mig_catalogue_matches_the_user_guide():
    assert mig_profiles_for_model("A30") == {"1g.6gb": 4, "1g.6gb+me": 1, "2g.12gb": 2, "2g.12gb+me": 1, "4g.24gb": 1}
    assert mig_profiles_for_model("A100-SXM4-40GB")["1g.5gb"] == 7
    assert mig_profiles_for_model("A100-SXM4-40GB")["3g.20gb"] == 2
    assert mig_profiles_for_model("A100-SXM4-80GB")["7g.80gb"] == 1
    assert mig_profiles_for_model("H100-SXM5-94GB")["3g.47gb"] == 2
    assert mig_profiles_for_model("H200")["1g.18gb"] == 7
    assert mig_profiles_for_model("Tesla-T4") == {}
    assert family_for_model("Tesla-T4") is None
    # every family has seven or five profiles and a whole-GPU one
    for fam in MIG_CATALOGUE.values():
        assert max(int(p.split("g.")[0]) for p in fam.profiles) in (4, 7)


def test_parse_memory():
    assert parse_memory("16G") == 16 * 1024**3
    assert parse_memory("16Gi") == 16 * 1024**3
    assert parse_memory("512M") == 512 * 1024**2
    assert parse_memory(1000) == 1000
    for bad in ("16GB", "lots", "-1G", 0, True, "1.5X"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def _with(index: int, **changes):
    cfg = copy.deepcopy(EXAMPLE)
    for k, v in changes.items():
        if v is _DELETE:
            cfg[index].pop(k)
        else:
            cfg[index][k] = v
    return cfg


_DELETE = object()

# (config, expected fragment of the one-line problem)
BAD_CONFIGS = {
    "not-a-list": ({"name": "cpu"}, "must be a list of profile dicts"),
    "entry-not-dict": (["cpu"], "profile #1: must be a dict"),
    "unknown-key": (_with(0, memroy="4G"), "profile 'cpu' (#1), field 'memroy': unknown key (did you mean 'memory'?)"),
    "missing-name": (_with(0, name=_DELETE), "profile #1, field 'name': missing"),
    "bad-name": (_with(1, name="A100 GPU"), "field 'name': 'A100 GPU' must be lowercase"),
    "duplicate-name": (EXAMPLE + [dict(EXAMPLE[2])], "profile 'mig-small' (#5), field 'name': duplicate of profile #3"),
    "several-defaults": (_with(1, default=True), "profiles 'cpu', 'a100', field 'default': several profiles are marked default"),
    "default-not-bool": (_with(0, default="yes"), "field 'default': 'yes' must be True or False"),
    "gpu-not-dict": (_with(1, gpu="A100"), "profile 'a100' (#2), field 'gpu': must be a dict"),
    "gpu-unknown-key": (_with(1, gpu={"model": "A100-SXM4-80GB", "cuont": 2}), "field 'gpu.cuont': unknown key (did you mean 'count'?)"),
    "gpu-count-zero": (_with(1, gpu={"model": "A100-SXM4-80GB", "count": 0}), "field 'gpu.count': 0 must be a whole number >= 1"),
    "gpu-count-negative": (_with(1, gpu={"model": "A100-SXM4-80GB", "count": -2}), "field 'gpu.count': -2 must be"),
    "gpu-count-float": (_with(1, gpu={"model": "A100-SXM4-80GB", "count": 1.5}), "field 'gpu.count': 1.5 must be"),
    "gpu-model-missing": (_with(1, gpu={"count": 1}), "field 'gpu.model': None must be the GPU Feature Discovery product label"),
    "mig-wrong-for-model": (_with(2, gpu={"model": "A100-SXM4-80GB", "mig": "1g.5gb"}),
                            "profile 'mig-small' (#3), field 'gpu.mig': '1g.5gb' does not exist on A100-SXM4-80GB (A100-80GB)"),
    "mig-h100-94-slice-on-80": (_with(2, gpu={"model": "NVIDIA-H100-80GB-HBM3", "mig": "3g.47gb"}), "'3g.47gb' does not exist on NVIDIA-H100-80GB-HBM3"),
    "mig-on-t4": (_with(3, gpu={"model": "Tesla-T4", "mig": "1g.5gb"}), "field 'gpu.mig': model 'Tesla-T4' does not support MIG"),
    "mig-malformed": (_with(2, gpu={"model": "A100-SXM4-80GB", "mig": "small"}), "'small' is not a MIG profile name"),
    "mig-and-shared": (_with(2, gpu={"model": "A100-SXM4-80GB", "mig": "1g.10gb", "shared": True}), "field 'gpu.shared': a profile is either a MIG slice"),
    "mig-bad-strategy": (_with(2, gpu={"model": "A100-SXM4-80GB", "mig": "1g.10gb", "strategy": "mixd"}), "field 'gpu.strategy': 'mixd' must be 'mixed' or 'single'"),
    "strategy-without-mig": (_with(1, gpu={"model": "A100-SXM4-80GB", "strategy": "mixed"}), "field 'gpu.strategy': only applies to MIG"),
    "shared-count-2": (_with(3, gpu={"model": "Tesla-T4", "shared": True, "count": 2}), "field 'gpu.count': a time-sliced share"),
    "bad-resource": (_with(1, gpu={"model": "A100-SXM4-80GB", "resource": "gpu"}), "field 'gpu.resource': 'gpu' is not an extended resource"),
    "cpu-zero": (_with(0, cpu=0), "field 'cpu': 0 must be a positive number"),
    "cpu-string": (_with(0, cpu="2"), "field 'cpu': '2' must be a positive number"),
    "cpu-limit-below": (_with(0, cpu_limit=1), "field 'cpu_limit': 1 is below cpu 2"),
    "memory-bad-unit": (_with(0, memory="4GB"), "field 'memory': '4GB' is not a memory size"),
    "memory-limit-below": (_with(0, memory_limit="1G"), "field 'memory_limit': is below memory"),
    "negative-cost": (_with(1, hourly_cost=-1), "field 'hourly_cost': -1 must be a number >= 0"),
    "cost-string": (_with(1, hourly_cost="4.10"), "field 'hourly_cost': '4.10' must be a number"),
    "idle-timeout-words": (_with(1, idle_timeout="half an hour"), "field 'idle_timeout': 'half an hour' is not a duration"),
    "groups-string": (_with(1, groups="ml-team"), "field 'groups': must be a list of JupyterHub group names"),
    "groups-empty": (_with(1, groups=[]), "field 'groups': is empty"),
    "images-empty": (_with(1, images={}), "field 'images': is empty"),
    "image-bad-ref": (_with(1, images={"torch": "not an image!"}), "field 'images[0].image': 'not an image!' is not an image reference"),
    "images-two-defaults": (_with(1, images=[{"name": "a", "image": "x/a:1", "default": True}, {"name": "b", "image": "x/b:1", "default": True}]),
                            "field 'images': several image choices are marked default"),
    "custom-image-unanchored": (_with(1, custom_image={"validation_regex": "quay\\.io/ml/.*"}),
                                "field 'custom_image.validation_regex': 'quay\\\\.io/ml/.*' is not anchored"),
    "custom-image-end-unanchored": (_with(1, custom_image={"validation_regex": "^quay\\.io/ml/"}), "is not anchored"),
    "custom-image-bad-regex": (_with(1, custom_image={"validation_regex": "^quay(.io$"}), "does not compile"),
    "custom-image-no-regex": (_with(1, custom_image={"display": "Other"}), "field 'custom_image.validation_regex': is required"),
    "node-selector-bad-value": (_with(1, node_selector={"pool": "gpu pool"}), "field 'node_selector': value 'gpu pool' of 'pool' is not a valid label value"),
    "toleration-bad-operator": (_with(1, tolerations=[{"key": "x", "operator": "Equals"}]), "field 'tolerations[0].operator': 'Equals' must be 'Equal' or 'Exists'"),
    "toleration-bad-effect": (_with(1, tolerations=[{"key": "x", "operator": "Exists", "effect": "NoScheduling"}]), "field 'tolerations[0].effect': 'NoScheduling' must be one of"),
    "override-misspelled": (_with(1, kubespawner_override={"mem_limt": "1G"}), "field 'kubespawner_override.mem_limt': no such KubeSpawner setting (did you mean 'mem_limit'?)"),
    "queue-not-a-name": (_with(1, queue="Team A"), "field 'queue': 'Team A' must name a Kueue LocalQueue"),
    "queue-not-a-string": (_with(1, queue=["a"]), "field 'queue': ['a'] must name a Kueue LocalQueue"),
    "queue-too-long": (_with(1, queue="q" * 64), "field 'queue':"),
    "queue-misspelt": (_with(1, queu="team-a"), "field 'queu': unknown key (did you mean 'queue'?)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_with_one_line_naming_profile_and_field(case):
    cfg, fragment = BAD_CONFIGS[case]
    before = copy.deepcopy(cfg)
    with pytest.raises(ProfileConfigError) as e:
        load_catalogue(cfg, known_override_keys={"mem_limit", "image", "cpu_limit"})
    msg = str(e.value)
    assert fragment in msg, msg
    assert msg.splitlines()[0].startswith("gpu_profiles has ")
    assert cfg == before  # the input is left untouched
    # every problem is exactly one line
    assert len(e.value.problems) == len(msg.splitlines()) - 1


def test_corpus_is_large_enough():
    assert len(BAD_CONFIGS) >= 20


def test_all_problems_reported_at_once():
    cfg = _with(1, gpu={"model": "A100-SXM4-80GB", "count": 0}, hourly_cost=-3, idle_timeout="soon")
    with pytest.raises(ProfileConfigError) as e:
        load_catalogue(cfg)
    fields = [p.split("field ")[1].split(":")[0] for p in e.value.problems]
    assert fields == ["'gpu.count'", "'hourly_cost'", "'idle_timeout'"]


def test_empty_catalogue_is_allowed_and_has_no_default():
    cat = load_catalogue([])
    assert len(cat) == 0 and cat.default is None


def test_readme_mig_table_matches_the_catalogue():
    from pathlib import Path

    notes = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for fam in MIG_CATALOGUE.values():
        row = (
            f"| {fam.name} | " + ", ".join(f"`{m}`" for m in fam.models) + " | "
            + ", ".join(f"`{p}` ×{n}" for p, n in fam.profiles.items()) + " |"
        )
        assert row in notes, row
