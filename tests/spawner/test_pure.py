"""Pure parts of the spawner: expansion, list merges, option checks, quota, form HTML."""

from __future__ import annotations

from decimal import Decimal
from html.parser import HTMLParser

import pytest

from hubml.availability import Availability
from hubml.profile_config import load_catalogue
from hubml.spawner import admission, quota
from hubml.spawner.expansion import expand_catalogue
from hubml.spawner.form import form_entries, render_form
from hubml.spawner.merges import and_node_selector_terms, merge_trait

CAT = load_catalogue([
    {"name": "cpu", "display": "CPU · 2 cores · 4 GiB", "cpu": 2, "memory": "4G", "default": True},
    {"name": "a100", "display": "1 × A100 80GB", "gpu": {"model": "A100-SXM4-80GB", "count": 1},
     "cpu": 8, "memory": "64G", "hourly_cost": 4.10, "idle_timeout": "30m", "groups": ["ml-team"],
     "images": [{"name": "torch", "display": "PyTorch", "image": "quay.io/jupyter/pytorch-notebook:2025-01-06"},
                {"name": "jax", "display": "JAX", "image": "ghcr.io/ml/jax:0.4", "default": True}],
     "custom_image": {"validation_regex": r"^quay\.io/ml/[a-z0-9-]+:[a-z0-9.-]+$"}},
    {"name": "mig-small", "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.10gb"}, "cpu": 2, "memory": "16G"},
    {"name": "t4-shared", "gpu": {"model": "Tesla-T4", "shared": True}, "cpu": 2, "memory": "8G", "hourly_cost": 0.35},
])


def initialized(pl):
    """What KubeSpawner._get_initialized_profile_list adds (defaults, unlisted_choice)."""
    for p in pl:
        for opt in (p.get("profile_options") or {}).values():
            opt.setdefault("unlisted_choice", {"enabled": False})
    return pl


PL = initialized(expand_catalogue(CAT))


def test_expansion_of_each_profile_kind():
    by = {p["slug"]: p for p in PL}
    a = by["a100"]["kubespawner_override"]
    assert a["extra_resource_guarantees"] == a["extra_resource_limits"] == {"nvidia.com/gpu": "1"}
    assert a["cpu_guarantee"] == a["cpu_limit"] == 8.0
    assert a["mem_guarantee"] == a["mem_limit"] == 64 * 1024**3
    assert a["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert a["node_affinity_required"] == [{"matchExpressions": [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB"]}]}]
    assert a["extra_labels"]["hubml.io/hourly-cost"] == "4.10"
    assert a["extra_annotations"]["hubml.io/idle-timeout"] == "1800"
    img = by["a100"]["profile_options"]["image"]
    assert img["choices"]["jax"]["default"] and not img["choices"]["torch"]["default"]
    assert img["choices"]["torch"]["kubespawner_override"] == {"image": "quay.io/jupyter/pytorch-notebook:2025-01-06"}
    assert img["unlisted_choice"]["kubespawner_override"] == {"image": "{value}"}
    m = by["mig-small"]["kubespawner_override"]
    assert m["extra_resource_limits"] == {"nvidia.com/mig-1g.10gb": "1"}
    assert m["node_selector"] == {"nvidia.com/mig.strategy": "mixed"}
    c = by["cpu"]["kubespawner_override"]
    assert "tolerations" not in c and "extra_resource_limits" not in c and by["cpu"]["default"]
    assert c["environment"] == {"NVIDIA_VISIBLE_DEVICES": "void"}
    assert not any("environment" in by[g]["kubespawner_override"] for g in ("a100", "mig-small", "t4-shared"))


def test_cpu_profile_environment_merges_with_the_profiles_own():
    cat = load_catalogue([{"name": "cpu", "cpu": 1, "memory": "1G",
                           "kubespawner_override": {"environment": {"OMP_NUM_THREADS": "1"}}}])
    o = expand_catalogue(cat)[0]["kubespawner_override"]
    assert o["environment"] == {"NVIDIA_VISIBLE_DEVICES": "void", "OMP_NUM_THREADS": "1"}


def test_tolerations_extend_base_and_do_not_duplicate():
    base = [{"key": "dedicated", "operator": "Equal", "value": "hub", "effect": "NoSchedule"},
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    merged = merge_trait("tolerations", base, CAT.get("a100").tolerations())
    assert merged == base
    merged = merge_trait("tolerations", base[:1], CAT.get("a100").tolerations())
    assert merged == base
    # the dict form KubeSpawner also accepts is sorted by key, then extended
    assert merge_trait("tolerations", {"b": base[1], "a": base[0]}, []) == base


def test_node_affinity_terms_are_anded_not_ored():
    zone = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
    pool = {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["x"]}]}
    gpu = {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["T4"]}]}
    assert and_node_selector_terms([], [gpu]) == [gpu]
    out = and_node_selector_terms([zone, pool], [gpu])
    assert out == [
        {"matchExpressions": zone["matchExpressions"] + gpu["matchExpressions"]},
        {"matchExpressions": pool["matchExpressions"] + gpu["matchExpressions"]},
    ]


def test_volumes_extend_and_replace_by_name():
    base = [{"name": "home", "persistentVolumeClaim": {"claimName": "h"}}, {"name": "shm", "emptyDir": {}}]
    extra = [{"name": "shm", "emptyDir": {"medium": "Memory"}}, {"name": "data", "nfs": {"server": "n", "path": "/"}}]
    out = merge_trait("volumes", base, extra)
    assert [v["name"] for v in out] == ["home", "shm", "data"]
    assert out[1] == extra[0]
    mounts = merge_trait("volume_mounts", [{"name": "home", "mountPath": "/home/jovyan"}],
                         [{"name": "data", "mountPath": "/data"}, {"name": "home2", "mountPath": "/home/jovyan"}])
    assert mounts == [{"name": "data", "mountPath": "/data"}, {"name": "home2", "mountPath": "/home/jovyan"}]


BAD_OPTIONS = {
    "unknown-profile": ({"profile": "a1000"}, 400, "Unknown profile 'a1000'. Choose one of: cpu, a100, mig-small, t4-shared."),
    "profile-not-string": ({"profile": ["a100"]}, 400, "Unknown profile ['a100']"),
    "unknown-choice": ({"profile": "a100", "image": "tensorflow"}, 400, "Unknown choice 'tensorflow' for option 'image' of profile 'a100'. Choose one of: torch, jax."),
    "choice-not-string": ({"profile": "a100", "image": 3}, 400, "Unknown choice 3"),
    "unknown-key": ({"profile": "a100", "imagee": "torch"}, 400, "Unknown server option 'imagee'"),
    "option-on-profile-without-options": ({"profile": "cpu", "image": "torch"}, 400, "Unknown server option 'image'. Profile 'cpu' takes: profile."),
    "unlisted-not-matching": ({"profile": "a100", "image--unlisted-choice": "quay.io/ml/x:1; rm -rf /"}, 400, "is not allowed for 'image'"),
    "unlisted-other-registry": ({"profile": "a100", "image--unlisted-choice": "docker.io/evil/x:1"}, 400, "is not allowed"),
    "unlisted-where-disabled": ({"profile": "mig-small", "image--unlisted-choice": "x"}, 400, "Unknown server option 'image--unlisted-choice'"),
    "both-choice-and-unlisted": ({"profile": "a100", "image": "torch", "image--unlisted-choice": "quay.io/ml/a:1"}, 400, "not both"),
    "not-a-dict": (["a100"], 400, "Server options must be a JSON object, got list."),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_user_options_get_a_400_message(case):
    opts, status, fragment = BAD_OPTIONS[case]
    r = admission.check_user_options(PL, opts)
    assert isinstance(r, admission.Refusal), r
    assert r.status == status and fragment in r.message, r.message


def test_good_user_options():
    assert admission.check_user_options(PL, {})["slug"] == "cpu"
    assert admission.check_user_options(PL, {"profile": "a100", "image": "torch"})["slug"] == "a100"
    assert admission.check_user_options(PL, {"profile": "a100", "image--unlisted-choice": "quay.io/ml/a:1.0"})["slug"] == "a100"


def test_group_and_per_user_limit():
    a100 = CAT.get("a100")
    r = admission.check_groups(a100, ["students"])
    assert r.status == 403 and "reserved for the group ml-team" in r.message
    assert admission.check_groups(a100, ["ml-team"]) is None
    # a second A100 with limit 1: refused, naming the server holding one
    r = admission.check_user_gpu_limit(a100, CAT, [("", "a100")], 1)
    assert r.status == 403 and "would give you 2 GPUs, above the limit of 1" in r.message
    assert "default server uses 1 (a100)" in r.message
    assert admission.check_user_gpu_limit(a100, CAT, [("", "cpu")], 1) is None
    assert admission.check_user_gpu_limit(CAT.get("cpu"), CAT, [("", "a100")], 1) is None
    assert admission.check_user_gpu_limit(a100, CAT, [("x", "a100")], 0) is None


def test_full_profile_refusal_names_alternatives():
    av = {
        "a100": Availability("a100", "nvidia.com/gpu", 0, 16, 2, 0),
        "mig-small": Availability("mig-small", "nvidia.com/mig-1g.10gb", 5, 16, 1, 5),
        "t4-shared": Availability("t4-shared", "nvidia.com/gpu", 0, 4, 1, 0),
    }
    r = admission.check_availability(CAT.get("a100"), av["a100"], CAT, av)
    assert r.status == 409
    assert r.message == "no A100 80GB free: 0 of 16; mig-small has 5 free."
    assert admission.check_availability(CAT.get("mig-small"), av["mig-small"], CAT, av) is None
    # no candidate node at all (e.g. its only node went NotReady): said so, not "0 of 0"
    gone = Availability("a100", "nvidia.com/gpu", 0, 0, 0, 0)
    r = admission.check_availability(CAT.get("a100"), gone, CAT, {**av, "a100": gone})
    assert r.status == 409 and r.message == (
        "no A100 80GB free: no node offering it is Ready and open to this profile right now "
        "(NotReady, cordoned, or tainted against it); mig-small has 5 free.")


def test_failed_scheduling_translation():
    msg = ("0/7 nodes are available: 2 Insufficient nvidia.com/gpu, 5 node(s) didn't match Pod's node "
           "affinity/selector. preemption: 0/7 nodes are available: 2 No preemption victims found.")
    out = admission.translate_failed_scheduling(msg, CAT.get("a100"), Availability("a100", "nvidia.com/gpu", 0, 16, 2, 0))
    assert "not enough nvidia.com/gpu for A100 80GB (0 of 16 free)" in out
    assert admission.translate_failed_scheduling("0/7 nodes are available: 7 node(s) had untolerated taint", CAT.get("a100")) is None
    assert admission.translate_failed_scheduling("3 Insufficient cpu", CAT.get("a100")) is None


def test_quota_explanation():
    assert quota.parse_quantity("500m") == Decimal("0.5")
    assert quota.parse_quantity("16Gi") == 16 * 2**30
    assert quota.parse_quantity("1e3") == 1000
    with pytest.raises(ValueError):
        quota.parse_quantity("lots")
    usage = quota.pod_quota_usage({"cpu": 8, "memory": 64 * 2**30, "nvidia.com/gpu": "1"},
                                  {"cpu": 8, "memory": 64 * 2**30, "nvidia.com/gpu": "1"})
    rq = {"metadata": {"name": "team"}, "status": {
        "hard": {"requests.nvidia.com/gpu": "2", "limits.memory": "100Gi", "pods": "10"},
        "used": {"requests.nvidia.com/gpu": "2", "limits.memory": "40Gi", "pods": "3"}}}
    problems = quota.quota_problems([rq], usage)
    assert problems == ["quota 'team' allows requests.nvidia.com/gpu 2, 2 already in use, this server needs 1",
                        "quota 'team' allows limits.memory 100 GiB, 40 GiB already in use, this server needs 64 GiB"]
    assert "namespace 'ml'" in quota.explain("ml", problems)
    rq["status"]["used"]["requests.nvidia.com/gpu"] = "1"
    rq["status"]["used"]["limits.memory"] = "1Gi"
    assert quota.quota_problems([rq], usage) == []


class _Inputs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.radios, self.texts, self._cur = {}, {}, None
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "input" and a.get("type") == "radio":
            self.radios[a["value"]] = {"disabled": "disabled" in a, "checked": "checked" in a}
        if tag == "label" and "data-profile" in a:
            self._cur = a["data-profile"]
            self.texts[self._cur] = ""

    def handle_data(self, data):
        if self._cur:
            self.texts[self._cur] += data


def test_form_html_shows_free_cost_and_disables_full_and_hides_other_groups():
    av = {
        "a100": Availability("a100", "nvidia.com/gpu", 0, 16, 2, 0),
        "mig-small": Availability("mig-small", "nvidia.com/mig-1g.10gb", 5, 16, 1, 5),
        "t4-shared": Availability("t4-shared", "nvidia.com/gpu", 3, 4, 1, 3),
    }
    html = render_form(form_entries(PL, CAT, av, ["students"]))
    p = _Inputs()
    p.feed(html)
    assert list(p.radios) == ["cpu", "mig-small", "t4-shared"]  # a100 is ml-team only: hidden
    assert p.radios["cpu"] == {"disabled": False, "checked": True}
    assert "5 free of 16" in p.texts["mig-small"]
    assert "$0.35/h" in p.texts["t4-shared"] and "3 free of 4" in p.texts["t4-shared"]

    html = render_form(form_entries(PL, CAT, av, ["ml-team"], selected="a100"))
    p = _Inputs()
    p.feed(html)
    assert p.radios["a100"] == {"disabled": True, "checked": False}  # full: disabled, not pre-selected
    assert p.radios["cpu"]["checked"]
    assert "0 free of 16" in p.texts["a100"] and "$4.10/h" in p.texts["a100"] and "full right now" in p.texts["a100"]
    assert 'name="profile-option-a100--image"' in html
    assert 'pattern="^quay\\.io/ml/[a-z0-9-]+:[a-z0-9.-]+$"' in html


def test_form_escapes_admin_text():
    cat = load_catalogue([{"name": "x", "display": "<script>alert(1)</script>", "cpu": 1}])
    html = render_form(form_entries(expand_catalogue(cat), cat, {}, []))
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html


def test_show_restricted_shows_disabled_with_reason():
    html = render_form(form_entries(PL, CAT, {}, [], show_restricted=True))
    p = _Inputs()
    p.feed(html)
    assert p.radios["a100"]["disabled"] and "reserved for ml-team" in p.texts["a100"]


def test_everything_full_shows_a_notice():
    cat = load_catalogue([{"name": "g", "gpu": {"model": "Tesla-T4"}}])
    pl = expand_catalogue(cat)
    html = render_form(form_entries(pl, cat, {"g": Availability("g", "nvidia.com/gpu", 0, 0, 0, 0)}, []))
    assert 'id="hubml-no-profile"' in html and "no matching node in the cluster" in html


def test_slim_pod_keeps_what_availability_needs():
    from hubml.availability import pod_extended_requests
    from hubml.spawner.informer import slim_pod

    pod = {"metadata": {"name": "p", "namespace": "n", "uid": "u", "managedFields": [{"x": 1}], "labels": {"a": "b"}},
           "spec": {"nodeName": "gpu-0", "volumes": [{"name": "v"}],
                    "containers": [{"name": "c", "image": "i", "env": [{"name": "X"}],
                                    "resources": {"limits": {"nvidia.com/gpu": "2"}}}],
                    "initContainers": [{"name": "i", "resources": {"limits": {"nvidia.com/gpu": "3"}}}]},
           "status": {"phase": "Running", "conditions": [{"type": "Ready"}]}}
    s = slim_pod(pod)
    assert pod_extended_requests(s) == pod_extended_requests(pod) == {"nvidia.com/gpu": 3}
    assert s["spec"]["nodeName"] == "gpu-0" and s["status"] == {"phase": "Running"}
    assert "managedFields" not in s["metadata"] and "volumes" not in s["spec"]
