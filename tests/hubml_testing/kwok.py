"""kwok's own configuration (its kubelet-like server, the CRDs it watches) and the container-log
files it serves: CRI-format records and the ``Logs`` objects that name those files. Pure functions
except ``append_container_log``, which writes one record batch to a file."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any


#: the kinds kwok is told to watch (KwokConfiguration options.enableCRDs)
KWOK_ENABLED_CRDS = ("Logs", "ClusterLogs")
KWOK_API = "/apis/kwok.x-k8s.io/v1alpha1"


def kwok_configuration(port: int, cert_file: Path, key_file: Path) -> dict[str, Any]:
    """kwok's options beyond the stages: its kubelet-like server and the CRDs it watches.

    The server (containerLogs, exec, ...; what the API server proxies
    ``pods/log`` to) listens on every address at `port`, because the API server
    dials each simulated node at its own loopback InternalIP (127.0.1.x,
    127.2.x.x) and one socket cannot listen on 127.0.0.0/8 alone; `nodePort`
    makes kwok advertise that port as every node's
    status.daemonEndpoints.kubeletEndpoint.Port. It serves HTTPS with a
    certificate of the cluster CA valid for 127.0.0.1 and every address of
    NODE_NETWORK. No profiling handler: nothing but logs is served from files.

    kwok applies no defaults to a configuration read from a file (kwokctl writes
    complete ones), so the rest of the options are kwok v0.8.0's defaults, spelled out.
    """
    if not 0 < port < 65536:
        raise ValueError(f"kwok's server port must be in 1..65535, got {port!r}")
    return {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "metadata": {"name": "hubml-test"},
        "options": {
            "enableCRDs": list(KWOK_ENABLED_CRDS),
            "serverAddress": f"0.0.0.0:{port}",
            "nodePort": port,
            "tlsCertFile": str(cert_file),
            "tlsPrivateKeyFile": str(key_file),
            "enableDebuggingHandlers": True,
            "enableProfilingHandler": False,
            "enableContentionProfiling": False,
            # kwok's defaults (SetObjectDefaults_KwokConfiguration)
            "manageAllNodes": False,
            "podPlayStageParallelism": 4,
            "nodePlayStageParallelism": 4,
            "nodeLeaseParallelism": 4,
            "podsOnNodeSyncParallelism": 1,
            "enablePodsOnNodeSyncListPager": True,
            "enablePodsOnNodeSyncStreamWatch": False,
        },
    }


def cri_log_lines(lines: Iterable[str], stream: str = "stdout", partial: bool = False,
                  at: datetime.datetime | None = None) -> str:
    """`lines` in the CRI log format container runtimes write and the kubelet (and kwok) read back.

    One record per line: ``<RFC3339Nano time> <stdout|stderr> <F|P> <text>``;
    ``P`` marks a partial line (the runtime split it, or the process has not
    written its newline yet): the reader hands out its text without a newline.
    `partial` marks the last line so. Text must not contain a newline (a
    carriage return is content, as runtimes split on newlines only).
    """
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"stream must be 'stdout' or 'stderr', got {stream!r}")
    lines = list(lines)
    bad = [t for t in lines if not isinstance(t, str) or "\n" in t]
    if bad:
        raise ValueError(f"log lines must be strings without newlines (one record each), got {bad[0]!r}")
    at = at or datetime.datetime.now(datetime.timezone.utc)
    stamp = at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    out = []
    for i, text in enumerate(lines):
        tag = "P" if partial and i == len(lines) - 1 else "F"
        out.append(f"{stamp} {stream} {tag} {text}\n")
    return "".join(out)


def append_container_log(path: Path | str, lines: Iterable[str], stream: str = "stdout",
                         partial: bool = False) -> None:
    """Append `lines` (CRI format, see cri_log_lines) to a log file kwok serves; one write,
    so a reader never sees half a record."""
    data = cri_log_lines(lines, stream, partial).encode()
    with open(path, "ab") as f:
        f.write(data)


def logs_manifest(namespace: str, pod: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A kwok ``Logs`` object: which file holds the log of which container of pod `namespace/pod`."""
    for what, value in (("namespace", namespace), ("pod", pod)):
        if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", value):
            raise ValueError(f"{what} must be a Kubernetes object name, got {value!r}")
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Logs",
        "metadata": {"name": pod, "namespace": namespace},
        "spec": {"logs": entries},
    }
