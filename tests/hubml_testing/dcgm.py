"""The DCGM exporter's ``/metrics`` format, and a stand-in exporter for the real node.

A physical GPU is the one thing these tests cannot run, so what NVIDIA's dcgm-exporter
would report is produced here, in its own exposition format (the metric, its labels and
the ``namespace``/``pod``/``container`` labels it adds from the kubelet's pod-resources
API), for Prometheus to scrape as it scrapes the real one.

:class:`NodeDcgmExporter` serves the real node's pods: every pod the node runs that
holds ``nvidia.com/gpu`` gets one series per GPU it was granted. Nothing on that node
touches a GPU (the workloads run on the CPU), so each reads 0 %, which is what a real
exporter reports for a GPU that a pod holds and leaves idle.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

METRIC = "DCGM_FI_DEV_GPU_UTIL"
GPU_RESOURCE = "nvidia.com/gpu"


def exposition(gpus: Mapping[tuple[str, str], Sequence[float]], *, model: str = "NVIDIA A100-SXM4-80GB",
               hostname: str = "node-1", container: str = "notebook") -> str:
    """``DCGM_FI_DEV_GPU_UTIL`` lines for ``{(namespace, pod): [percent per GPU]}``, as
    dcgm-exporter 3.x writes them (UUIDs stable per pod and GPU index)."""
    lines = [f"# HELP {METRIC} GPU utilization (in %).", f"# TYPE {METRIC} gauge"]
    for (ns, pod), utils in sorted(gpus.items()):
        for i, u in enumerate(utils):
            uuid = zlib.crc32(f"{ns}/{pod}/{i}".encode()) % 10**8
            lines.append(
                f'{METRIC}{{gpu="{i}",UUID="GPU-{uuid:08d}",device="nvidia{i}",modelName="{model}",'
                f'Hostname="{hostname}",DCGM_FI_DRIVER_VERSION="550.54.15",container="{container}",'
                f'namespace="{ns}",pod="{pod}"}} {u:g}'
            )
    return "\n".join(lines) + "\n"


def granted_gpus(pod: Mapping[str, Any]) -> int:
    """How many ``nvidia.com/gpu`` the pod's containers were granted (their limits)."""
    return sum(int(c.get("resources", {}).get("limits", {}).get(GPU_RESOURCE, 0))
               for c in pod.get("spec", {}).get("containers", []))


class NodeDcgmExporter:
    """A dcgm-exporter for the real node, on 127.0.0.1 in a thread of the test process.

    Each scrape lists the node's running pods from the API server (``rest``: the test
    cluster's :class:`~hubml_testing.kube_rest.Rest`), as the real exporter asks the
    kubelet which pod holds which GPU.
    """

    def __init__(self, rest: Any, node: str, *, model: str = "hubml-CPU-as-GPU") -> None:
        self.rest, self.node, self.model = rest, node, model
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="dcgm-standin", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        """``host:port`` for Prometheus's static_configs."""
        return f"127.0.0.1:{self._server.server_address[1]}"

    def render(self) -> str:
        selector = quote(f"spec.nodeName={self.node},status.phase=Running")
        pods = self.rest.must("GET", f"/api/v1/pods?fieldSelector={selector}")["items"]
        gpus = {(p["metadata"]["namespace"], p["metadata"]["name"]): [0.0] * granted_gpus(p)
                for p in pods if not p["metadata"].get("deletionTimestamp")}
        gpus = {pod: utils for pod, utils in gpus.items() if utils}
        return exposition(gpus, model=self.model, hostname=self.node)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
