"""Shared set-up for the spawner tests that run a real JupyterHub against the test cluster."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

from hubml_testing.kube_cluster import KubeCluster

PROFILES = [
    {"name": "cpu", "display": "CPU · 0.5 core", "cpu": 0.5, "memory": "512M", "default": True},
    {"name": "a100", "display": "1 × A100 80GB", "gpu": {"model": "A100-SXM4-80GB", "count": 1},
     "cpu": 1, "memory": "2G", "hourly_cost": 4.10, "idle_timeout": "30m", "groups": ["ml-team"],
     "images": [{"name": "torch", "display": "PyTorch", "image": "registry.invalid/ml/torch:2"},
                {"name": "jax", "display": "JAX", "image": "registry.invalid/ml/jax:0.4"}],
     "custom_image": {"validation_regex": r"^registry\.invalid/ml/[a-z0-9-]+:[a-z0-9.-]+$"}},
    {"name": "mig-small", "display": "A100 MIG 1g.10gb", "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.10gb"},
     "cpu": 0.5, "memory": "1G", "hourly_cost": 0.60},
    {"name": "h100-mig", "display": "H100 MIG 1g.20gb", "gpu": {"model": "H100-80GB-HBM3", "mig": "1g.20gb"}},
    {"name": "t4-shared", "display": "T4 shared", "gpu": {"model": "Tesla-T4", "shared": True},
     "cpu": 0.5, "memory": "1G", "hourly_cost": 0.35},
]

BASE_TOLERATION = {"key": "hub.jupyter.org/dedicated", "operator": "Equal", "value": "user", "effect": "NoSchedule"}
BASE_AFFINITY = {"key": "kubernetes.io/hostname", "operator": "Exists"}
BASE_VOLUME = {"name": "shm", "emptyDir": {"medium": "Memory"}}

T4_NODE = "gpu-t4-shared-0"


def hub_config(namespace: str, **extra: Any) -> dict[str, Any]:
    cfg = {
        "JupyterHub.spawner_class": "hubml",
        "JupyterHub.allow_named_servers": True,
        "JupyterHub.tornado_settings": {"slow_spawn_timeout": 30},
        "HubMLSpawner.namespace": namespace,
        "HubMLSpawner.image": "registry.invalid/ml/base:1",
        "HubMLSpawner.start_timeout": 90,
        "HubMLSpawner.http_timeout": 300,
        "HubMLSpawner.gpu_profiles": PROFILES,
        "HubMLSpawner.tolerations": [BASE_TOLERATION],
        "HubMLSpawner.node_affinity_required": [{"matchExpressions": [BASE_AFFINITY]}],
        "HubMLSpawner.volumes": [BASE_VOLUME],
        "HubMLSpawner.volume_mounts": [{"name": "shm", "mountPath": "/dev/shm"}],
    }
    cfg.update(extra)
    return cfg


def start_gpu_hub(factory, cluster: KubeCluster, namespace: str, **extra: Any):
    return factory(
        config=hub_config(namespace, **extra),
        users=["alice", "bob"],
        groups={"ml-team": ["alice"]},
        env={"KUBECONFIG": str(cluster.kubeconfig)},
    )


def user_pods(cluster: KubeCluster, namespace: str, user: str) -> list[dict]:
    out = cluster.rest.must(
        "GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector=hub.jupyter.org/username={user}"
    )
    return [p for p in out["items"] if not p["metadata"].get("deletionTimestamp")]


def wait(check, what: str, timeout: float = 60.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {v!r})")
        time.sleep(interval)


_pool = concurrent.futures.ThreadPoolExecutor(4)


def post_in_background(hub, path: str, body: dict) -> concurrent.futures.Future:
    """POST without blocking: a spawn that succeeds keeps the request open until the
    server answers HTTP, and the simulated pods never do."""
    return _pool.submit(hub.api, "POST", path, body, timeout=120)


def node_free(cluster: KubeCluster, node: str, resource: str) -> int:
    n = cluster.rest.must("GET", f"/api/v1/nodes/{node}")
    alloc = int(n["status"]["allocatable"].get(resource, 0))
    pods = cluster.rest.must("GET", f"/api/v1/pods?fieldSelector=spec.nodeName={node}")["items"]
    used = 0
    for p in pods:
        if p["status"].get("phase") in ("Succeeded", "Failed"):
            continue
        for c in p["spec"]["containers"]:
            used += int(((c.get("resources") or {}).get("limits") or {}).get(resource, 0))
    return alloc - used


def fill_node(cluster: KubeCluster, namespace: str, node: str, resource: str) -> list[str]:
    """Create pods (through the scheduler) taking every free ``resource`` on ``node``."""
    free = node_free(cluster, node, resource)
    names = []
    for i in range(free):
        name = f"filler-{node}-{i}"
        cluster.rest.must("POST", f"/api/v1/namespaces/{namespace}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": {"kwok.hubml.io/outcome": "run"}},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "c", "image": "registry.invalid/filler:1",
                                "resources": {"limits": {resource: "1"}, "requests": {resource: "1"}}}],
            },
        })
        names.append(name)

    def all_bound():
        for n in names:
            p = cluster.rest.must("GET", f"/api/v1/namespaces/{namespace}/pods/{n}")
            if not p["spec"].get("nodeName"):
                return False
        return True

    wait(all_bound, f"filler pods bound to {node}")
    return names


def delete_pods(cluster: KubeCluster, namespace: str, names: list[str]) -> None:
    for n in names:
        cluster.rest.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{n}?gracePeriodSeconds=0")


def spawn_form(hub, user: str) -> str:
    """The HTML of /hub/spawn as ``user`` sees it, checked to hold hubml's form."""
    from hubml_testing.jupyterhub import spawn_page

    html = spawn_page(hub.url, user)
    if 'id="hubml-profiles"' not in html:
        raise AssertionError(f"no hubml form on /hub/spawn for {user}:\n{html[:2000]}")
    return html
