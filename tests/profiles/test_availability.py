"""Availability: allocatable minus requests of non-terminated pods, per profile."""

from __future__ import annotations

import random

from hubml.availability import UsageIndex, compute_availability, pod_extended_requests
from hubml.profile_config import load_catalogue

TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def node(name, product, alloc, *, mig_strategy=None, taints=(TAINT,), ready="True", unschedulable=False):
    labels = {"nvidia.com/gpu.product": product} if product else {}
    if mig_strategy:
        labels["nvidia.com/mig.strategy"] = mig_strategy
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": list(taints), "unschedulable": unschedulable},
        "status": {"allocatable": {"cpu": "96", "memory": "1Ti", **alloc},
                   "conditions": [{"type": "Ready", "status": ready}]},
    }


def pod(name, node_name, res, phase="Running", ns="default", init=None):
    spec = {"nodeName": node_name, "containers": [{"name": "c", "resources": {"limits": res, "requests": res}}]}
    if init:
        spec["initContainers"] = [{"name": "i", "resources": {"limits": init}}]
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec, "status": {"phase": phase}}


CAT = load_catalogue([
    {"name": "cpu", "cpu": 1},
    {"name": "a100", "gpu": {"model": "A100-SXM4-80GB"}},
    {"name": "a100x4", "gpu": {"model": "A100-SXM4-80GB", "count": 4}},
    {"name": "mig-small", "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.10gb"}},
    {"name": "t4", "gpu": {"model": "Tesla-T4", "shared": True}},
])

NODES = [
    node("a1", "NVIDIA-A100-SXM4-80GB", {"nvidia.com/gpu": "8"}, mig_strategy="single"),
    node("a2", "NVIDIA-A100-SXM4-80GB", {"nvidia.com/gpu": "8"}, mig_strategy="single"),
    node("mig", "NVIDIA-A100-SXM4-80GB", {"nvidia.com/mig-1g.10gb": "16", "nvidia.com/mig-3g.40gb": "8"}, mig_strategy="mixed"),
    node("t4", "Tesla-T4-SHARED", {"nvidia.com/gpu": "4"}),
    node("cpu1", None, {}, taints=()),
    # never counted: cordoned, not ready, wrong model, untolerated taint
    node("cordoned", "NVIDIA-A100-SXM4-80GB", {"nvidia.com/gpu": "8"}, unschedulable=True),
    node("notready", "NVIDIA-A100-SXM4-80GB", {"nvidia.com/gpu": "8"}, ready="False"),
    node("h100", "NVIDIA-H100-80GB-HBM3", {"nvidia.com/gpu": "8"}),
    node("dedicated", "NVIDIA-A100-SXM4-80GB", {"nvidia.com/gpu": "8"},
         taints=(TAINT, {"key": "dedicated", "value": "team-x", "effect": "NoSchedule"})),
]


def test_free_of_total_per_profile():
    pods = [
        pod("p1", "a1", {"nvidia.com/gpu": "7"}),
        pod("p2", "a2", {"nvidia.com/gpu": "5"}),
        pod("done", "a2", {"nvidia.com/gpu": "3"}, phase="Succeeded"),  # terminated: frees its GPUs
        pod("failed", "a2", {"nvidia.com/gpu": "3"}, phase="Failed"),
        pod("m", "mig", {"nvidia.com/mig-1g.10gb": "11"}),
        pod("t", "t4", {"nvidia.com/gpu": "4"}),
        pod("pending", "", {"nvidia.com/gpu": "8"}, phase="Pending"),  # not bound: holds nothing
        pod("cpu", "cpu1", {"cpu": "2"}),
    ]
    av = compute_availability(CAT, NODES, pods)
    assert "cpu" not in av
    assert (av["a100"].free, av["a100"].total, av["a100"].nodes) == (4, 16, 2)
    assert av["a100"].startable == 4 and not av["a100"].full
    # 1 free on a1 and 3 free on a2: no node has 4 free
    assert av["a100x4"].free == 4 and av["a100x4"].startable == 0 and av["a100x4"].full
    assert (av["mig-small"].free, av["mig-small"].total) == (5, 16)
    assert (av["t4"].free, av["t4"].total) == (0, 4) and av["t4"].full


def test_extra_tolerations_open_tainted_nodes():
    tol = ({"key": "dedicated", "operator": "Equal", "value": "team-x", "effect": "NoSchedule"},)
    assert compute_availability(CAT, NODES, [], tol)["a100"].total == 24
    assert compute_availability(CAT, NODES, [])["a100"].total == 16


def test_init_containers_count_as_max():
    p = pod("x", "a1", {"nvidia.com/gpu": "1"}, init={"nvidia.com/gpu": "3"})
    assert pod_extended_requests(p) == {"nvidia.com/gpu": 3}
    p2 = {"spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": 2}}},
                                  {"resources": {"requests": {"nvidia.com/gpu": "1", "cpu": "1"}}}]}}
    assert pod_extended_requests(p2) == {"nvidia.com/gpu": 3}


def test_incremental_index_equals_recomputation_under_random_churn():
    rng = random.Random(7)
    idx = UsageIndex()
    for n in NODES:
        idx.set_node(n)
    live: dict[str, dict] = {}
    choices = [("a1", "nvidia.com/gpu"), ("a2", "nvidia.com/gpu"), ("mig", "nvidia.com/mig-1g.10gb"), ("t4", "nvidia.com/gpu")]
    for step in range(2000):
        key = f"ns/p{rng.randrange(60)}"
        r = rng.random()
        if r < 0.5:
            nn, res = rng.choice(choices)
            p = pod(key.split("/")[1], nn, {res: str(rng.randint(1, 2))},
                    phase=rng.choice(["Running", "Running", "Pending", "Succeeded"]), ns="ns")
            live[key] = p
            idx.set_pod(key, p)
        elif r < 0.8 and live:
            key = rng.choice(sorted(live))
            live.pop(key)
            idx.remove_pod(key)
        else:  # a node relabel (cordon/uncordon) bumps the generation
            n = dict(rng.choice(NODES[:4]))
            n["spec"] = {**n["spec"], "unschedulable": rng.random() < 0.3}
            idx.set_node(n)
        if step % 97 == 0:
            current_nodes = list(idx.nodes.values())
            assert idx.availability_all(CAT) == compute_availability(CAT, current_nodes, live.values())
    assert idx.availability_all(CAT) == compute_availability(CAT, list(idx.nodes.values()), live.values())
    for n in list(idx.nodes):
        idx.remove_node(n)
    assert all(a.total == 0 and a.full for a in idx.availability_all(CAT).values())
