"""Names the real-node tests share: the single-user image and a CPU profile that places
pods on the real node (it is tainted, so only pods with this toleration land there)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from hubml_testing.images import IMAGES
from hubml_testing.kube_node import REAL_NODE_LABELS, REAL_NODE_TOLERATION

SINGLEUSER = IMAGES["singleuser"]
HUB = IMAGES["hub"]
SERVING = IMAGES["serving"]
REAL_PROFILE = {"name": "cpu-real", "display": "CPU on the real node", "cpu": 0.5, "memory": "1500M",
                "node_selector": {"hubml.io/node": "real"}, "tolerations": [REAL_NODE_TOLERATION]}
#: one of the GPUs the real node advertises (GPU Feature Discovery's product label names the
#: model; the workloads run on the CPU and the DCGM stand-in reports the GPU idle)
GPU_REAL_PROFILE = {"name": "gpu-real", "display": "1 GPU on the real node", "cpu": 0.5, "memory": "1500M",
                    "gpu": {"model": REAL_NODE_LABELS["nvidia.com/gpu.product"], "count": 1},
                    "tolerations": [REAL_NODE_TOLERATION]}


def user_pods(kube_cluster: Any, namespace: str, user: str) -> list[dict[str, Any]]:
    """The user's server pods in ``namespace`` (by KubeSpawner's username label), less those
    being deleted."""
    out = kube_cluster.rest.must(
        "GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector=hub.jupyter.org/username={user}")
    return [p for p in out["items"] if not p["metadata"].get("deletionTimestamp")]


def hub_stack() -> ModuleType:
    """tests/hub_ext/conftest.py (``start_stack``, ``running_stack``, its ``PROFILES``) as a
    module: a conftest is not importable by name, so it is loaded from its file, as bench/ does."""
    if "hub_ext_stack" in sys.modules:
        return sys.modules["hub_ext_stack"]
    spec = importlib.util.spec_from_file_location("hub_ext_stack", Path(__file__).parents[1] / "hub_ext" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
