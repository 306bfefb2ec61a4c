"""HubMLSpawner through a real JupyterHub (with configurable-http-proxy) against the
real control plane with simulated GPU nodes (kube-scheduler, kwok)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from gpu_hub import (
    BASE_AFFINITY,
    BASE_TOLERATION,
    BASE_VOLUME,
    PROFILES,
    T4_NODE,
    delete_pods,
    fill_node,
    post_in_background,
    spawn_form,
    start_gpu_hub,
    user_pods,
    wait,
)

pytestmark = [pytest.mark.kube, pytest.mark.hub, pytest.mark.slow]

GPU_TOL = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

LANDING = {
    # profile: (nodes it may land on, extended resource, product values)
    "a100": ({"gpu-a100-0", "gpu-a100-1"}, "nvidia.com/gpu", ["A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB"]),
    "mig-small": ({"gpu-a100-mig-0"}, "nvidia.com/mig-1g.10gb", ["A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB"]),
    "h100-mig": ({"gpu-h100-mig-0"}, "nvidia.com/mig-1g.20gb", ["H100-80GB-HBM3", "NVIDIA-H100-80GB-HBM3"]),
    "t4-shared": ({T4_NODE}, "nvidia.com/gpu", ["Tesla-T4-SHARED", "NVIDIA-Tesla-T4-SHARED"]),
    "cpu": ({"cpu-0", "cpu-1"}, None, None),
}


@pytest.mark.parametrize("profile", sorted(LANDING))
def test_profile_lands_on_matching_node_with_exact_pod_spec(profile, kube_cluster, kube_namespace, jupyterhub_factory):
    hub = start_gpu_hub(jupyterhub_factory, kube_cluster, kube_namespace)
    nodes, resource, products = LANDING[profile]
    opts = {"profile": profile}
    if profile == "a100":
        opts["image"] = "jax"
    fut = post_in_background(hub, "/users/alice/server", opts)
    pod = wait(lambda: [p for p in user_pods(kube_cluster, kube_namespace, "alice") if p["spec"].get("nodeName")],
               f"alice's {profile} pod to be scheduled")[0]
    try:
        spec, meta = pod["spec"], pod["metadata"]
        assert spec["nodeName"] in nodes
        res = spec["containers"][0]["resources"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0].get("env", [])}
        # a CPU server on a GPU node must not see the node's devices (NVIDIA runtime: no limit = all GPUs)
        assert env.get("NVIDIA_VISIBLE_DEVICES") == (None if resource else "void")
        if resource:
            assert res["limits"][resource] == "1" and res["requests"][resource] == "1"
            assert [t for t in spec["tolerations"] if t.get("key") in ("nvidia.com/gpu", "hub.jupyter.org/dedicated")] == [
                BASE_TOLERATION, GPU_TOL]
            terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            # the profile's product requirement is ANDed into the configured term, not ORed beside it
            assert terms == [{"matchExpressions": [
                BASE_AFFINITY, {"key": "nvidia.com/gpu.product", "operator": "In", "values": products}]}]
            assert meta["labels"]["hubml.io/gpu-model"] == next(p for p in PROFILES if p["name"] == profile)["gpu"]["model"]
            assert meta["annotations"]["hubml.io/gpu-resource"] == resource
        else:
            assert not any("nvidia.com" in k for k in res.get("limits", {}))
            assert [t for t in spec.get("tolerations", []) if t.get("key") == "nvidia.com/gpu"] == []
        other = {"a100": "nvidia.com/mig-1g.10gb", "mig-small": "nvidia.com/gpu"}.get(profile)
        if other:
            assert other not in res.get("limits", {})
        assert meta["labels"]["hubml.io/profile"] == profile
        assert BASE_VOLUME in spec["volumes"]
        if profile == "a100":
            assert spec["containers"][0]["image"] == "registry.invalid/ml/jax:0.4"
            assert meta["labels"]["hubml.io/hourly-cost"] == "4.10"
            assert meta["annotations"]["hubml.io/idle-timeout"] == "1800"
            assert res["limits"]["cpu"] == "1" and int(res["requests"]["memory"]) == int(res["limits"]["memory"]) == 2 * 1024**3
    finally:
        hub.stop_server("alice")
        fut.result(timeout=120)
    wait(lambda: not user_pods(kube_cluster, kube_namespace, "alice"), "alice's pod to be deleted")


BAD_API_OPTIONS = {
    "unknown-profile": ({"profile": "a1000"}, "Unknown profile 'a1000'. Choose one of: cpu, a100, mig-small, h100-mig, t4-shared."),
    "unknown-choice": ({"profile": "a100", "image": "tensorflow"}, "Unknown choice 'tensorflow' for option 'image'"),
    "unknown-key": ({"profile": "mig-small", "gpus": 4}, "Unknown server option 'gpus'"),
    "unlisted-image-outside-regex": ({"profile": "a100", "image--unlisted-choice": "docker.io/evil/miner:1"}, "is not allowed for 'image'"),
    "profile-wrong-type": ({"profile": {"name": "a100"}}, "Unknown profile"),
}


def test_rest_api_bad_options_get_400_with_message_and_create_nothing(kube_cluster, kube_namespace, jupyterhub_factory):
    hub = start_gpu_hub(jupyterhub_factory, kube_cluster, kube_namespace)
    for case, (opts, fragment) in BAD_API_OPTIONS.items():
        status, body = hub.api("POST", "/users/alice/server", opts)
        assert status == 400, (case, status, body)
        assert fragment in body["message"], (case, body)
        assert "KeyError" not in body["message"]
        assert hub.servers("alice") == {}, case
    assert user_pods(kube_cluster, kube_namespace, "alice") == []
    assert "Traceback" not in hub.log_tail(400)


def test_group_restricted_profile_is_refused_server_side(kube_cluster, kube_namespace, jupyterhub_factory):
    hub = start_gpu_hub(jupyterhub_factory, kube_cluster, kube_namespace)
    status, body = hub.api("POST", "/users/bob/server", {"profile": "a100"})
    assert status == 403
    assert "reserved for the group ml-team" in body["message"]
    assert user_pods(kube_cluster, kube_namespace, "bob") == []
    # and hidden from bob's form, while alice sees it
    assert 'value="a100"' not in spawn_form(hub, "bob")
    assert 'value="a100"' in spawn_form(hub, "alice")


def test_full_profile_refused_at_once_and_disabled_in_form(kube_cluster, kube_namespace, jupyterhub_factory):
    fillers = fill_node(kube_cluster, kube_namespace, T4_NODE, "nvidia.com/gpu")
    try:
        hub = start_gpu_hub(jupyterhub_factory, kube_cluster, kube_namespace)
        status, body = hub.api("POST", "/users/alice/server", {"profile": "t4-shared"})
        assert status == 409, body
        msg = body["message"]
        assert msg.startswith("no T4 (shared) free: 0 of 4; ")
        assert "mig-small has " in msg  # names profiles that have room
        assert user_pods(kube_cluster, kube_namespace, "alice") == []
        html = spawn_form(hub, "alice")
        t4 = html[html.index('data-profile="t4-shared"'):]
        t4 = t4[: t4.index("</label>")]
        assert "disabled" in t4 and "0 free of 4" in t4 and "$0.35/h" in t4
        mig = html[html.index('data-profile="mig-small"'):]
        assert "free of 16" in mig[: mig.index("</label>")]
    finally:
        delete_pods(kube_cluster, kube_namespace, fillers)


def test_unschedulable_pod_fails_the_spawn_with_a_translated_message_and_is_removed(
    kube_cluster, kube_namespace, jupyterhub_factory
):
    fillers = fill_node(kube_cluster, kube_namespace, T4_NODE, "nvidia.com/gpu")
    try:
        # without the availability check the pod reaches the scheduler, which says Insufficient
        hub = start_gpu_hub(jupyterhub_factory, kube_cluster, kube_namespace, **{"HubMLSpawner.gpu_availability": False})
        status, body = hub.api("POST", "/users/alice/server", {"profile": "t4-shared"}, timeout=120)
        assert status == 409, body
        assert "The cluster has no room for this server: not enough nvidia.com/gpu for T4 (shared)" in body["message"]
        assert "Insufficient nvidia.com/gpu" in body["message"]
        wait(lambda: not user_pods(kube_cluster, kube_namespace, "alice"), "the unschedulable pod to be removed")
        assert hub.servers("alice") == {}
    finally:
        delete_pods(kube_cluster, kube_namespace, fillers)


def test_namespace_quota_is_explained(kube_cluster, kube_namespace, jupyterhub_factory):
    kube_cluster.rest.must("POST", f"/api/v1/namespaces/{kube_namespace}/resourcequotas", {
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "team-gpus"},
        "spec": {"hard": {"requests.nvidia.com/gpu": "0", "requests.cpu": "8"}},
    })
    hub = start_gpu_hub(jupyterhub_factory, kube_cluster, kube_namespace)
    status, body = hub.api("POST", "/users/alice/server", {"profile": "t4-shared"})
    assert status == 403, body
    assert body["message"] == (
        f"This server would exceed the resource quota of namespace '{kube_namespace}': quota 'team-gpus' "
        "allows requests.nvidia.com/gpu 0, 0 already in use, this server needs 1. Stop another server in this "
        "namespace, pick a smaller profile, or ask a hub admin to raise the quota."
    )
    assert user_pods(kube_cluster, kube_namespace, "alice") == []
    assert hub.servers("alice") == {}


def test_per_user_gpu_maximum_across_servers(kube_cluster, kube_namespace, jupyterhub_factory):
    hub = start_gpu_hub(jupyterhub_factory, kube_cluster, kube_namespace, **{"HubMLSpawner.max_gpus_per_user": 1})
    fut = post_in_background(hub, "/users/alice/servers/one", {"profile": "mig-small"})
    try:
        wait(lambda: [p for p in user_pods(kube_cluster, kube_namespace, "alice") if p["spec"].get("nodeName")],
             "alice's first GPU server")
        status, body = hub.api("POST", "/users/alice/servers/two", {"profile": "t4-shared"})
        assert status == 403, body
        assert body["message"] == (
            "Starting 't4-shared' would give you 2 GPUs, above the limit of 1 per user "
            "(your other servers: one uses 1 (mig-small)). Stop one of them first."
        )
        assert len(user_pods(kube_cluster, kube_namespace, "alice")) == 1
    finally:
        hub.stop_server("alice", "one")
        fut.result(timeout=120)


def test_hub_refuses_to_start_with_bad_profiles(tmp_path):
    from hubml_testing.jupyterhub import _config_text

    bad = [
        {"name": "a100", "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.5gb"}},
        {"name": "a100", "cpuu": 2},
        {"name": "t4", "gpu": {"model": "Tesla-T4", "count": 0}, "default": True},
        {"name": "cpu", "default": True, "kubespawner_override": {"mem_limt": "1G"}},
    ]
    text = _config_text(
        workdir=tmp_path, public_port=1, proxy_api_port=1, hub_ip="127.0.0.1", hub_port=1, admin_token="x" * 32,
        proxy_token="y" * 32,
        config={"JupyterHub.spawner_class": "hubml", "HubMLSpawner.gpu_profiles": bad}, extra_config="",
    )
    (tmp_path / "jupyterhub_config.py").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "jupyterhub", "-f", str(tmp_path / "jupyterhub_config.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    assert proc.returncode == 1
    err = proc.stderr
    assert "HubMLSpawner.gpu_profiles has 5 problems" in err
    for line in (
        "profile 'a100' (#1), field 'gpu.mig': '1g.5gb' does not exist on A100-SXM4-80GB (A100-80GB)",
        "profile 'a100' (#2), field 'name': duplicate of profile #1",
        "profile 'a100' (#2), field 'cpuu': unknown key (did you mean 'cpu'?)",
        "profile 't4' (#3), field 'gpu.count': 0 must be a whole number >= 1",
        "profile 'cpu' (#4), field 'kubespawner_override.mem_limt': no such KubeSpawner setting (did you mean 'mem_limit'?)",
    ):
        assert line in err, err
    # it stopped before starting the proxy
    assert "Starting proxy" not in err


def test_stock_profile_list_keeps_working_with_validation_and_extension(kube_cluster, kube_namespace, jupyterhub_factory):
    extra_tol = {"key": "team", "operator": "Equal", "value": "legacy", "effect": "NoSchedule"}
    stock = [{
        "display_name": "Legacy small", "slug": "small",
        "kubespawner_override": {"cpu_limit": 0.25, "tolerations": [extra_tol]},
        "profile_options": {"image": {"display_name": "Image", "choices": {
            "a": {"display_name": "A", "kubespawner_override": {"image": "registry.invalid/legacy/a:1"}}}}},
    }]
    hub = start_gpu_hub(jupyterhub_factory, kube_cluster, kube_namespace,
                        **{"HubMLSpawner.gpu_profiles": [], "HubMLSpawner.profile_list": stock})
    # stock KubeSpawner raises KeyError('zzz') deep in _load_profile here
    status, body = hub.api("POST", "/users/alice/server", {"profile": "small", "image": "zzz"})
    assert status == 400 and "Unknown choice 'zzz' for option 'image' of profile 'small'. Choose one of: a." == body["message"]
    fut = post_in_background(hub, "/users/alice/server", {"profile": "small", "image": "a"})
    try:
        pod = wait(lambda: user_pods(kube_cluster, kube_namespace, "alice"), "alice's pod")[0]
        assert pod["spec"]["containers"][0]["image"] == "registry.invalid/legacy/a:1"
        assert pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "250m"
        assert [t for t in pod["spec"]["tolerations"] if t.get("key") in ("team", "hub.jupyter.org/dedicated")] == [
            BASE_TOLERATION, extra_tol]
    finally:
        hub.stop_server("alice")
        fut.result(timeout=120)


def test_spawn_progress_says_which_kueue_queue_holds_the_server(kube_cluster, kube_namespace, jupyterhub_factory):
    """kubespawner #922: a pod Kueue gates gets no scheduler events, so the spawn page said nothing. With a
    ``queue`` profile the pod carries kueue.x-k8s.io/queue-name, Kueue's admission (hubml_testing.kueue) gates
    it, and the progress stream names the queue."""
    import json as _json
    import urllib.request

    from hubml_testing.kueue import GATE, QUEUE_LABEL, kueue_admission

    queued = {"name": "cpu-queued", "display": "CPU (team queue)", "cpu": 1, "memory": "1G", "queue": "team-a"}
    with kueue_admission(kube_cluster.rest, kube_namespace):
        hub = start_gpu_hub(jupyterhub_factory, kube_cluster, kube_namespace,
                            **{"HubMLSpawner.gpu_profiles": [*PROFILES, queued], "HubMLSpawner.start_timeout": 30})
        fut = post_in_background(hub, "/users/alice/server", {"profile": "cpu-queued"})
        pod = wait(lambda: user_pods(kube_cluster, kube_namespace, "alice"), "alice's pod")[0]
        assert pod["metadata"]["labels"][QUEUE_LABEL] == "team-a"
        assert [g["name"] for g in pod["spec"]["schedulingGates"]] == [GATE]
        req = urllib.request.Request(hub.api_url + "/users/alice/server/progress",
                                     headers={"Authorization": f"token {hub.admin_token}"})
        messages = []
        with urllib.request.urlopen(req, timeout=60) as stream:
            for raw in stream:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    messages.append(_json.loads(line[5:]).get("message", ""))
                    if any("Kueue LocalQueue 'team-a'" in m for m in messages):
                        break
        assert any(m.startswith("Pending: your server queued in Kueue LocalQueue 'team-a'") for m in messages), messages
        # never admitted: the spawn times out and KubeSpawner removes the pod
        fut.result(timeout=120)
        wait(lambda: not user_pods(kube_cluster, kube_namespace, "alice"), "the queued pod to be removed", timeout=90)
