"""Bench: the GPU spawn form and the start-time overhead at 1,000 nodes / 20,000 pods,
against stock KubeSpawner's profile form in the same run.

    .venv/bin/python bench/spawner_form.py            # real control plane (tests/hubml_testing)
    .venv/bin/python bench/spawner_form.py --memory   # same sizes, node/pod dicts in memory

With the control plane, 1,000 kwok nodes and 20,000 pods are created
(``scale_up``), both spawners are built from the cluster's kubeconfig, and
HubMLSpawner's informer lists and watches them for real.  The GPU usage comes
from 2,000 extra GPU pods spread over the scale nodes.

Measured per render: HubMLSpawner's form (availability for every profile +
template) vs ``KubeSpawner._render_options_form`` on the same expanded
profile list (what stock KubeSpawner does per request when profile_list is a
callable).  Start overhead: ``HubMLSpawner.load_user_options`` (validation,
groups, availability, quota read from the API server) vs KubeSpawner's.
Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROFILES = [
    {"name": "cpu", "display": "CPU · 2 cores", "cpu": 2, "memory": "4G", "default": True},
    {"name": "a100", "display": "1 × A100 80GB", "gpu": {"model": "A100-SXM4-80GB"}, "cpu": 8, "memory": "64G",
     "hourly_cost": 4.10, "images": {"torch": "registry.invalid/ml/torch:2", "jax": "registry.invalid/ml/jax:0.4"}},
    {"name": "a100x4", "display": "4 × A100 80GB", "gpu": {"model": "A100-SXM4-80GB", "count": 4}, "hourly_cost": 16.4},
    {"name": "mig-small", "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.10gb"}, "hourly_cost": 0.6},
    {"name": "mig-3g", "gpu": {"model": "A100-SXM4-80GB", "mig": "3g.40gb"}, "hourly_cost": 2.0},
    {"name": "h100-mig", "gpu": {"model": "H100-80GB-HBM3", "mig": "1g.20gb"}, "hourly_cost": 1.1},
    {"name": "t4-shared", "gpu": {"model": "Tesla-T4", "shared": True}, "hourly_cost": 0.35},
]
SCALE_TOLERATION = {"key": "hubml.io/scale", "operator": "Exists", "effect": "NoSchedule"}


def median_ms(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


async def amedian_ms(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def gpu_pods(nodes: list[dict], count: int, namespace: str) -> list[dict]:
    rng = random.Random(1)
    pods = []
    gpu_nodes = [n for n in nodes if any(k.startswith("nvidia.com/") for k in n["status"]["allocatable"])]
    for i in range(count):
        n = rng.choice(gpu_nodes)
        res = rng.choice([k for k in n["status"]["allocatable"] if k.startswith("nvidia.com/")])
        pods.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"gpu-pod-{i}", "namespace": namespace},
            "spec": {"nodeName": n["metadata"]["name"], "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "c", "image": "registry.invalid/x:1",
                                     "resources": {"limits": {res: "1"}, "requests": {res: "1"}}}]},
            "status": {"phase": "Running"},
        })
    return pods


def write_kubeconfig(server: str, token: str, ca: str | None) -> str:
    import yaml

    cluster = {"server": server}
    if ca:
        cluster["certificate-authority"] = ca
    else:
        cluster["insecure-skip-tls-verify"] = True
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "b",
           "clusters": [{"name": "b", "cluster": cluster}],
           "users": [{"name": "b", "user": {"token": token}}],
           "contexts": [{"name": "b", "context": {"cluster": "b", "user": "b", "namespace": "default"}}]}
    fd, path = tempfile.mkstemp(suffix=".kubeconfig")
    os.write(fd, yaml.safe_dump(cfg).encode())
    os.close(fd)
    return path


async def run(memory: bool, nodes_n: int, pods_n: int, gpu_pods_n: int, reps: int) -> None:
    holder: dict = {}
    try:
        await _run(memory, nodes_n, pods_n, gpu_pods_n, reps, holder)
    finally:
        from kubespawner import KubeSpawner

        await KubeSpawner._stop_all_reflectors()
        cluster = holder.get("cluster")
        if cluster is not None and cluster.owned:
            cluster.stop()


async def _run(memory: bool, nodes_n: int, pods_n: int, gpu_pods_n: int, reps: int, holder: dict) -> None:
    from hubml.availability import UsageIndex
    from hubml_testing.kube_manifests import load_topology, scale_nodes, scale_pods

    topo = load_topology()
    nodes = scale_nodes(topo, nodes_n)
    for n in nodes:  # kwok reports Ready; in memory we say so
        n["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    cluster = None
    if memory:
        os.environ["KUBECONFIG"] = write_kubeconfig("https://127.0.0.1:9", "unused", None)
    else:
        from hubml_testing.kube_cluster import scale_up
        from hubml_testing.kube_control_plane import start_cluster

        cluster = holder["cluster"] = start_cluster()
        t0 = time.monotonic()
        scale_up(cluster, nodes=nodes_n, pods=pods_n)
        ns = "hubml-bench-gpu"
        cluster.rest.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        from concurrent.futures import ThreadPoolExecutor

        while cluster.rest.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default")[0] != 200:
            time.sleep(0.1)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: cluster.rest.request("POST", f"/api/v1/namespaces/{ns}/pods", p),
                          gpu_pods(nodes, gpu_pods_n, ns)))
        print(f"cluster: {nodes_n} nodes, {pods_n} + {gpu_pods_n} GPU pods created in {time.monotonic() - t0:.0f} s")
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)

    from kubespawner import KubeSpawner

    from hubml.spawner import HubMLSpawner

    ours = HubMLSpawner(_mock=True, gpu_profiles=PROFILES, tolerations=[SCALE_TOLERATION], namespace="default",
                        check_resource_quota=not memory)
    if memory:
        idx = UsageIndex()
        t0 = time.perf_counter()
        for n in nodes:
            idx.set_node(n)
        all_pods = scale_pods([n["metadata"]["name"] for n in nodes], pods_n, "hubml-scale") + gpu_pods(nodes, gpu_pods_n, "g")
        for p in all_pods:
            p.setdefault("status", {"phase": "Running"})
            idx.set_pod(f"{p['metadata']['namespace']}/{p['metadata']['name']}", p)
        print(f"in-memory index of {len(nodes)} nodes / {len(all_pods)} pods built in {(time.perf_counter() - t0):.2f} s")
        HubMLSpawner._usage_index = idx

        async def no_informer():
            return idx

        ours._ensure_informer = no_informer
    else:
        t0 = time.perf_counter()
        await ours._ensure_informer()
        print(f"informer first list (nodes + pods) took {time.perf_counter() - t0:.2f} s")

    profile_list = await ours._combined_profile_list()
    stock = KubeSpawner(_mock=True, profile_list=profile_list, namespace="default")
    html = await ours._render_hubml_form()
    assert "free of" in html, "availability missing from the form"
    print("sample:", [line.strip() for line in html.splitlines() if "free of" in line][:2])

    stock_ms = median_ms(lambda: stock._render_options_form(profile_list), reps)
    ours_ms = await amedian_ms(ours._render_hubml_form, reps)
    print(f"form render, median of {reps}: HubMLSpawner {ours_ms:.2f} ms, stock KubeSpawner {stock_ms:.2f} ms, "
          f"ratio {ours_ms / stock_ms:.2f}x")

    ours.user_options = {"profile": "mig-small"}
    stock.user_options = {"profile": "mig-small"}
    stock_start = await amedian_ms(stock.load_user_options, reps)
    ours_start = await amedian_ms(ours.load_user_options, reps)
    print(f"start overhead (load_user_options), median of {reps}: HubMLSpawner {ours_start:.2f} ms, "
          f"stock KubeSpawner {stock_start:.2f} ms, ratio {ours_start / stock_start:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", action="store_true", help="node/pod dicts in memory instead of the control plane")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--pods", type=int, default=20000)
    ap.add_argument("--gpu-pods", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    asyncio.run(run(a.memory, a.nodes, a.pods, a.gpu_pods, a.reps))


if __name__ == "__main__":
    main()
