"""Shared set-up of the hub service benchmarks: control plane + MLflow + JupyterHub + hub service.

Reuses the test harness (``tests/hubml_testing``) and the stack of the hub
service tests (``tests/hub_ext/conftest.py``: ``start_stack``/``stop_stack``), so
the benchmark measures exactly what the tests run: the service as a JupyterHub
service behind configurable-http-proxy, with a least-privilege ServiceAccount,
against kube-apiserver + controllers + scheduler + kwok nodes.

Set ``HUBML_KUBECONFIG`` to reuse a running control plane (``dev/kube-up``);
otherwise one is started and stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hubml_testing.kube_cluster import KubeCluster  # noqa: E402
from hubml_testing.kube_control_plane import start_cluster  # noqa: E402
from hubml_testing.mlflow_server import _stop as stop_mlflow  # noqa: E402
from hubml_testing.mlflow_server import start_mlflow_server  # noqa: E402
from hubml_testing.real_pods import hub_stack  # noqa: E402

stack = hub_stack()


@contextlib.asynccontextmanager
async def running_stack(users: list[str], extra_config: str = "") -> AsyncIterator[tuple[object, KubeCluster]]:
    tmp = Path(tempfile.mkdtemp(prefix="hubml-bench-hub-ext-"))
    reuse = os.environ.get("HUBML_KUBECONFIG")
    cluster = KubeCluster.from_kubeconfig(Path(reuse)) if reuse else start_cluster()
    mlflow, mlflow_proc = start_mlflow_server(tmp / "mlflow")
    svc = None
    try:
        svc = await stack.start_stack(cluster, mlflow.url, tmp, users=users, extra_config=extra_config)
        yield svc, cluster
    finally:
        if svc is not None:
            await stack.stop_stack(svc)
        stop_mlflow(mlflow_proc)
        if not reuse:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]
