"""A real Kubernetes control plane with kwok-simulated GPU nodes, for tests,
dev and benchmarks.

Why this exists: everything in hubml that talks to Kubernetes is tested
against a real API server (schema validation, admission, ResourceQuota,
scheduling, controllers, garbage collection), never a mock. This module runs
etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on
loopback from the binaries `dev/kube/build.sh` caches in
``~/.cache/hubml/kube-<version>/bin/``, creates the nodes of
``dev/kube/topology.yaml`` and installs the CRDs of ``dev/kube/crds/``
(and kwok's Logs/ClusterLogs CRDs of ``dev/kube/kwok-crds/``: kwok serves
container logs from files named in those objects, see ``serve_logs``).

Used three ways:

* the pytest plugin ``hubml_testing.kube`` (session fixture ``kube_cluster``);
* the command line, wrapped by ``dev/kube-up`` / ``dev/kube-down``::

      python tests/hubml_testing/kube_cluster.py up      # prints the KUBECONFIG path
      python tests/hubml_testing/kube_cluster.py down    # stops it, removes its state
      python tests/hubml_testing/kube_cluster.py scale --nodes 1000 --pods 20000

* benchmarks: ``start_cluster()`` / ``KubeCluster.stop()`` and ``scale_up()``.

Pure manifest building (nodes, scale pods, kubeconfigs, outcome annotations)
is kept in plain functions without I/O; process and HTTP work is at the edges.
Setup talks to the API server with a small synchronous REST client (standard
library only) so it can run outside any event loop; tests get
``kubernetes_asyncio`` clients from ``KubeCluster.api_client()``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBE_DEV_DIR = REPO_ROOT / "dev" / "kube"
VERSIONS_FILE = KUBE_DEV_DIR / "versions.env"
TOPOLOGY_FILE = KUBE_DEV_DIR / "topology.yaml"
STAGES_FILE = KUBE_DEV_DIR / "kwok-stages.yaml"
CRD_DIR = KUBE_DEV_DIR / "crds"
KWOK_CRD_DIR = KUBE_DEV_DIR / "kwok-crds"

#: short name -> CRD object name (file dev/kube/crds/<object name>.yaml)
CRDS: dict[str, str] = {
    "pytorchjob": "pytorchjobs.kubeflow.org",
    "trainjob": "trainjobs.trainer.kubeflow.org",
    "inferenceservice": "inferenceservices.serving.kserve.io",
}

#: kwok's own CRDs (dev/kube/kwok-crds/kwok.x-k8s.io_<file>.yaml -> CRD name), always installed:
#: kwok watches them (--enable-crds) to learn which file holds which container's log
KWOK_CRDS: dict[str, str] = {
    "logs": "logs.kwok.x-k8s.io",
    "clusterlogs": "clusterlogs.kwok.x-k8s.io",
}
#: the kinds kwok is told to watch (KwokConfiguration options.enableCRDs)
KWOK_ENABLED_CRDS = ("Logs", "ClusterLogs")
KWOK_API = "/apis/kwok.x-k8s.io/v1alpha1"

#: the InternalIPs of the topology nodes (node_ip); kwok's serving certificate covers all of them
NODE_NETWORK = "127.0.1.0/24"

#: binaries the control plane needs (kubectl and helm are built too, for humans and chart checks)
REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

#: annotation kwok matches to manage a node (see kwok --manage-nodes-with-annotation-selector)
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

#: the pod outcome contract (dev/kube/kwok-stages.yaml)
OUTCOME_ANNOTATION = "kwok.hubml.io/outcome"
EXIT_CODE_ANNOTATION = "kwok.hubml.io/exit-code"
REASON_ANNOTATION = "kwok.hubml.io/reason"
MESSAGE_ANNOTATION = "kwok.hubml.io/message"
DELAY_ANNOTATION = "kwok.hubml.io/delay"
OUTCOMES = ("succeed", "fail", "run")

#: label and NoSchedule taint key of scale-mode nodes
SCALE_LABEL = "hubml.io/scale"

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
STATE_FILE = "state.json"


class KubeHarnessError(RuntimeError):
    """The test control plane could not be built, started, reached or configured.

    The message always says what failed and how to fix it; tests must fail
    with it, never skip.
    """


# --------------------------------------------------------------------------
# versions and binaries
# --------------------------------------------------------------------------


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse dev/kube/versions.env (KEY=VALUE lines), the one place versions are pinned."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise KubeHarnessError(f"{path}: line {raw!r} is not KEY=VALUE; fix the file.")
        versions[key.strip()] = value.strip().strip('"')
    return versions


def cache_dir(versions: Mapping[str, str] | None = None) -> Path:
    """Where build.sh puts the binaries: ${HUBML_KUBE_CACHE:-${HUBML_CACHE:-~/.cache/hubml}}/kube-<KUBE_VERSION>."""
    versions = versions or read_versions()
    root = Path(
        os.environ.get("HUBML_KUBE_CACHE") or os.environ.get("HUBML_CACHE") or Path.home() / ".cache" / "hubml"
    )
    return root / f"kube-{versions['KUBE_VERSION']}"


def find_binaries(names: Iterable[str] = REQUIRED_BINARIES) -> dict[str, Path]:
    """Paths of the built binaries; raises naming the missing ones and the build command."""
    bin_dir = cache_dir() / "bin"
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        path = bin_dir / name
        stamp = bin_dir / f".{name}.stamp"
        if path.is_file() and os.access(path, os.X_OK) and stamp.is_file():
            found[name] = path
        else:
            missing.append(name)
    if missing:
        raise KubeHarnessError(
            f"Kubernetes harness binaries missing or half-built in {bin_dir}: {', '.join(missing)}. "
            f"Build them with `bash {KUBE_DEV_DIR / 'build.sh'}` (needs Go >= 1.26 and the Go "
            "module proxy; about an hour cold on 2 cores, seconds when cached) and rerun."
        )
    return found


# --------------------------------------------------------------------------
# pure manifest building
# --------------------------------------------------------------------------


def load_topology(path: Path = TOPOLOGY_FILE) -> dict[str, Any]:
    """Read and check the topology data file (profiles, nodes, scale)."""
    try:
        topo = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubeHarnessError(f"cannot read topology file {path}: {exc}") from exc
    profiles = topo.get("profiles") or {}
    for node in topo.get("nodes") or []:
        if node.get("profile") not in profiles:
            raise KubeHarnessError(
                f"{path}: node {node.get('name')!r} names unknown profile {node.get('profile')!r}; "
                f"use one of {sorted(profiles)}."
            )
    return topo


def node_manifest(
    name: str, profile: Mapping[str, Any], common_labels: Mapping[str, str], ip: str | None = None
) -> dict[str, Any]:
    """One kwok-managed Node object: labels, taints, allocatable = capacity from
    the profile, and its own InternalIP (pods' hostIP) when `ip` is given."""
    labels = {str(k): str(v) for k, v in common_labels.items()}
    labels.update({str(k): str(v) for k, v in (profile.get("labels") or {}).items()})
    labels["kubernetes.io/hostname"] = name
    resources = {str(k): str(v) for k, v in (profile.get("allocatable") or {}).items()}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {
                KWOK_NODE_ANNOTATION[0]: KWOK_NODE_ANNOTATION[1],
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": {"taints": [dict(t) for t in profile.get("taints") or []]},
        "status": {
            "allocatable": dict(resources),
            "capacity": dict(resources),
            **({"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}
               if ip else {}),
        },
    }


def node_ip(index: int, network: str = NODE_NETWORK) -> str:
    """The index-th host address of `network` (node InternalIPs, 127.0.1.1, 127.0.1.2 ...).

    Loopback addresses on purpose: the API server dials a node's InternalIP for
    `pods/log` and `exec` (at the port of the node's
    status.daemonEndpoints.kubeletEndpoint, which is kwok's server), and a
    simulated node must never send it off this machine (nor make it look a name
    up in DNS, hence InternalIP is preferred)."""
    return str(ipaddress.ip_network(network)[index + 1])


def topology_nodes(topology: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Node manifests for every entry of the topology's `nodes` list."""
    profiles = topology["profiles"]
    common = topology.get("nodeLabels") or {}
    return [
        node_manifest(n["name"], profiles[n["profile"]], common, node_ip(i)) for i, n in enumerate(topology["nodes"])
    ]


def scale_nodes(topology: Mapping[str, Any], count: int) -> list[dict[str, Any]]:
    """`count` node manifests named scale-<profile>-<i>, in the proportions of scale.mix,
    labelled and tainted hubml.io/scale=true so that only pods bound to them land there."""
    if count < 1:
        raise ValueError(f"scale node count must be >= 1, got {count}")
    mix: Mapping[str, int] = topology["scale"]["mix"]
    total = sum(mix.values())
    profiles = topology["profiles"]
    common = topology.get("nodeLabels") or {}
    # Largest-remainder split so the counts add up exactly to `count`.
    shares = {p: count * w / total for p, w in mix.items()}
    counts = {p: int(s) for p, s in shares.items()}
    for p in sorted(shares, key=lambda p: shares[p] - counts[p], reverse=True)[: count - sum(counts.values())]:
        counts[p] += 1
    nodes = []
    for prof, n in counts.items():
        for i in range(n):
            node = node_manifest(f"scale-{prof}-{i}", profiles[prof], common, node_ip(len(nodes), "127.2.0.0/16"))
            # Keep the scheduler off scale nodes: tests sharing the cluster must
            # still land on the named topology nodes. Scale pods tolerate it.
            node["metadata"]["labels"][SCALE_LABEL] = "true"
            node["spec"]["taints"].append({"key": SCALE_LABEL, "value": "true", "effect": "NoSchedule"})
            nodes.append(node)
    return nodes


def scale_pods(node_names: list[str], count: int, namespace: str) -> list[dict[str, Any]]:
    """`count` pod manifests bound round-robin to `node_names` via spec.nodeName.

    Binding directly skips the scheduler, which keeps creating 20,000 pods
    fast; they tolerate every taint and request a little CPU and memory only.
    """
    if not node_names:
        raise ValueError("scale_pods needs at least one node name")
    pods = []
    for i in range(count):
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"scale-pod-{i}",
                    "namespace": namespace,
                    "labels": {"app.kubernetes.io/name": "hubml-scale", "hubml.io/scale-index": str(i)},
                },
                "spec": {
                    "nodeName": node_names[i % len(node_names)],
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.invalid/hubml/scale:1",
                            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                        }
                    ],
                },
            }
        )
    return pods


def outcome_annotations(
    outcome: str,
    exit_code: int | None = None,
    reason: str | None = None,
    message: str | None = None,
    delay: str | None = None,
) -> dict[str, str]:
    """Annotations that make kwok drive a pod to `outcome` (see dev/kube/kwok-stages.yaml).

    succeed -> Succeeded with exit code 0; fail -> Failed with `exit_code`
    (default 1) and `reason` (default Error); run -> stays Running.
    `delay` is a Go duration ("2s", "500ms") kwok waits before the outcome.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    if outcome != "fail" and (exit_code is not None or reason is not None or message is not None):
        raise ValueError("exit_code, reason and message only apply to outcome='fail'")
    ann = {OUTCOME_ANNOTATION: outcome}
    if exit_code is not None:
        if isinstance(exit_code, bool) or not isinstance(exit_code, int) or not 1 <= exit_code <= 255:
            raise ValueError(f"a failing container's exit code must be an int in 1..255, got {exit_code!r}")
        ann[EXIT_CODE_ANNOTATION] = str(exit_code)
    if reason is not None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,63}", reason):
            raise ValueError(f"reason must be a CamelCase word like OOMKilled, got {reason!r}")
        ann[REASON_ANNOTATION] = reason
    if message is not None:
        ann[MESSAGE_ANNOTATION] = message
    if delay is not None:
        if not re.fullmatch(r"(\d+(\.\d+)?(ms|s|m|h))+", delay):
            raise ValueError(f"delay must be a Go duration such as '2s' or '500ms', got {delay!r}")
        ann[DELAY_ANNOTATION] = delay
    return ann


def kubeconfig_dict(
    server: str, ca_pem: bytes, token: str, user: str, namespace: str | None = None, cluster: str = "hubml-test"
) -> dict[str, Any]:
    """A kubeconfig with one cluster/user/context authenticating with a bearer token."""
    context: dict[str, Any] = {"cluster": cluster, "user": user}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": f"{user}@{cluster}", "context": context}],
        "current-context": f"{user}@{cluster}",
    }


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


# --------------------------------------------------------------------------
# PKI (CA, API server serving cert, service-account signing key)
# --------------------------------------------------------------------------


def make_pki(directory: Path) -> None:
    """Write ca.crt/ca.key, apiserver.crt/.key (SANs for loopback and the kubernetes service),
    kwok.crt/.key (kwok's kubelet-like server: 127.0.0.1 and every topology node address) and sa.key/sa.pub."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=3650)

    def pem_key(key: Any) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hubml-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = ec.generate_private_key(ec.SECP256R1())
    service_ip = next(ipaddress.ip_network(SERVICE_CIDR).hosts())
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(service_ip), x509.DNSName("localhost")]
    sans += [
        x509.DNSName(n)
        for n in ("kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")
    ]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    # kwok's server answers for every simulated node; a CA-signed certificate naming
    # their addresses keeps `pods/log` working if the API server is told to verify
    # kubelets (--kubelet-certificate-authority), as real clusters may be
    kwok_key = ec.generate_private_key(ec.SECP256R1())
    kwok_sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    kwok_sans += [x509.IPAddress(ip) for ip in ipaddress.ip_network(NODE_NETWORK).hosts()]
    kwok_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kwok-kubelet")]))
        .issuer_name(ca_name)
        .public_key(kwok_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.SubjectAlternativeName(kwok_sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(pem_key(ca_key))
    (directory / "apiserver.crt").write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "apiserver.key").write_bytes(pem_key(srv_key))
    (directory / "kwok.crt").write_bytes(kwok_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "kwok.key").write_bytes(pem_key(kwok_key))
    (directory / "sa.key").write_bytes(
        sa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for key_file in ("ca.key", "apiserver.key", "kwok.key", "sa.key"):
        os.chmod(directory / key_file, 0o600)


# --------------------------------------------------------------------------
# a small synchronous REST client (setup, readiness, scale mode)
# --------------------------------------------------------------------------


class Rest:
    """Minimal thread-safe Kubernetes REST client over keep-alive HTTPS connections."""

    def __init__(self, server: str, token: str, ca_file: Path) -> None:
        url = urllib.parse.urlsplit(server)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 443
        self.token = token
        self.ctx = ssl.create_default_context(cafile=str(ca_file))
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
            self._local.conn = conn
        return conn

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        return resp.status, payload

    def must(self, method: str, path: str, body: Any = None, ok: Iterable[int] = (200, 201), **kw: Any) -> Any:
        status, payload = self.request(method, path, body, **kw)
        if status not in tuple(ok):
            msg = payload.get("message") if isinstance(payload, dict) else payload
            raise KubeHarnessError(f"{method} {path} answered {status}: {msg}")
        return payload


# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class KubeCluster:
    """A running control plane: where it listens, how to authenticate, what runs it."""

    state_dir: Path
    server: str
    token: str
    ca_file: Path
    kubeconfig: Path
    pids: dict[str, int] = field(default_factory=dict)
    binaries: dict[str, str] = field(default_factory=dict)
    crds: list[str] = field(default_factory=list)
    kwok_port: int | None = None  # kwok's kubelet-like server (every node's kubeletEndpoint port)
    owned: bool = True  # False when reusing a cluster someone else started (HUBML_KUBECONFIG)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    # ---- access -------------------------------------------------------
    @property
    def rest(self) -> Rest:
        return Rest(self.server, self.token, self.ca_file)

    def configuration(self) -> Any:
        """A kubernetes_asyncio Configuration for the admin user of this cluster."""
        from kubernetes_asyncio import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.api_key = {"BearerToken": self.token}
        cfg.api_key_prefix = {"BearerToken": "Bearer"}
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.verify_ssl = True
        return cfg

    def api_client(self) -> Any:
        """A new kubernetes_asyncio ApiClient (use as `async with cluster.api_client() as api:`)."""
        from kubernetes_asyncio import client

        return client.ApiClient(configuration=self.configuration())

    def kubeconfig_text(self, namespace: str | None = None) -> str:
        return yaml.safe_dump(kubeconfig_dict(self.server, self.ca_file.read_bytes(), self.token, "admin", namespace))

    # ---- lifecycle ----------------------------------------------------
    def save(self) -> None:
        state = {
            "server": self.server,
            "token": self.token,
            "ca_file": str(self.ca_file),
            "kubeconfig": str(self.kubeconfig),
            "pids": self.pids,
            "binaries": self.binaries,
            "crds": self.crds,
            "kwok_port": self.kwok_port,
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_dir / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> KubeCluster:
        try:
            state = json.loads((state_dir / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise KubeHarnessError(f"no control plane state in {state_dir}: {exc}") from exc
        return cls(
            state_dir=state_dir,
            server=state["server"],
            token=state["token"],
            ca_file=Path(state["ca_file"]),
            kubeconfig=Path(state["kubeconfig"]),
            pids={k: int(v) for k, v in state["pids"].items()},
            binaries=state.get("binaries", {}),
            crds=list(state.get("crds", [])),
            kwok_port=state.get("kwok_port"),
        )

    @classmethod
    def from_kubeconfig(cls, path: Path) -> KubeCluster:
        """Attach to a cluster started elsewhere (e.g. by dev/kube-up) through its kubeconfig."""
        try:
            cfg = yaml.safe_load(Path(path).read_text())
            ctx_name = cfg["current-context"]
            ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
            clus = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
            user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
            token = user["token"]
            ca_pem = base64.b64decode(clus["certificate-authority-data"])
        except (OSError, KeyError, StopIteration, TypeError, ValueError, yaml.YAMLError) as exc:
            raise KubeHarnessError(
                f"cannot use kubeconfig {path}: {exc!r}. It must be one written by "
                "`dev/kube-up` (token user, certificate-authority-data); unset HUBML_KUBECONFIG "
                "to let the tests start their own control plane."
            ) from exc
        state_dir = Path(path).resolve().parent
        ca_file = state_dir / "pki" / "ca.crt"
        if not ca_file.is_file() or ca_file.read_bytes() != ca_pem:
            ca_file = Path(tempfile.mkdtemp(prefix="hubml-kube-ca-")) / "ca.crt"
            ca_file.write_bytes(ca_pem)
        crds: list[str] = []
        kwok_port = None
        with contextlib.suppress(KubeHarnessError, OSError):
            saved = KubeCluster.load(state_dir)
            crds, kwok_port = saved.crds, saved.kwok_port
        return cls(
            state_dir=state_dir,
            server=clus["server"],
            token=token,
            ca_file=ca_file,
            kubeconfig=Path(path),
            crds=crds,
            kwok_port=kwok_port,
            owned=False,
        )

    def is_healthy(self) -> bool:
        try:
            status, _ = self.rest.request("GET", "/readyz")
        except (OSError, http.client.HTTPException, ssl.SSLError):
            return False
        return status == 200

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process of this cluster (kwok first, etcd last) and remove its state."""
        if not self.owned:
            return
        stop_processes(self.pids, self.binaries, self._procs, timeout)
        self.pids.clear()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # ---- container logs (kwok Logs objects) ----------------------------
    def serve_logs(self, namespace: str, pod: str, path: Path | str, *, container: str | None = None,
                   timeout: float = 30.0) -> Path:
        """Make `path` the log of `container` (every container when None) of pod `namespace/pod`.

        Why: no container runs on a simulated node, so nothing writes logs; kwok
        reads them from a file named in a ``Logs`` object (kwok.x-k8s.io) and
        serves them on its kubelet API, which is where the API server proxies
        ``GET pods/<pod>/log`` (``kubectl logs``, with ``follow`` too). The file
        must hold CRI-format records: write it with ``append_container_log``;
        it is created empty when missing, and may be appended to while pods run.
        The pod need not exist yet (kwok matches the object by namespace and
        name). Returns once kwok serves the file (``KubeHarnessError`` after
        `timeout` s); a second call for another container of the same pod adds
        to the same object. The object goes away with its namespace.
        """
        path = Path(path).resolve()
        if path.is_dir():
            raise ValueError(f"{path} is a directory; serve_logs needs a log file (CRI format)")
        if container is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", container):
            raise ValueError(f"container must be a container name (DNS label), got {container!r}")
        entry: dict[str, Any] = {"logsFile": str(path), "follow": True}
        if container is not None:
            entry["containers"] = [container]
        obj = logs_manifest(namespace, pod, [entry])  # checks the names before anything exists
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        rest = self.rest
        url = f"{KWOK_API}/namespaces/{namespace}/logs"
        status, existing = rest.request("GET", f"{url}/{pod}")
        if status == 200:
            keep = [e for e in existing["spec"].get("logs") or [] if e.get("containers") != entry.get("containers")]
            obj["spec"]["logs"] = [entry, *keep]
            obj["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            rest.must("PUT", f"{url}/{pod}", obj)
        else:
            rest.must("POST", url, obj)
        self._wait_kwok_serves(namespace, pod, container or "any", path, timeout)
        return path

    def _wait_kwok_serves(self, namespace: str, pod: str, container: str, path: Path, timeout: float) -> None:
        """Poll kwok's own server until its watch of Logs objects has caught up (it answers 200)."""
        if self.kwok_port is None:  # attached to a cluster that did not record its kwok port
            return
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            conn = http.client.HTTPSConnection("127.0.0.1", self.kwok_port, timeout=5, context=ctx)
            try:
                conn.request("GET", f"/containerLogs/{namespace}/{pod}/{container}?limitBytes=1")
                resp = conn.getresponse()
                last = f"{resp.status} {resp.read()[:300].decode(errors='replace')}"
                if resp.status == 200:
                    return
            except (OSError, http.client.HTTPException) as exc:
                last = repr(exc)
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise KubeHarnessError(
                    f"kwok did not serve {path} as the log of {namespace}/{pod} within {timeout:.0f} s "
                    f"(last answer: {last}); see kwok.log in {self.state_dir / 'logs'}"
                )
            time.sleep(0.05)

    # ---- CRDs ---------------------------------------------------------
    def install_crds(self, names: Iterable[str]) -> None:
        install_crds(self.rest, names)
        for n in names:
            if n not in self.crds:
                self.crds.append(n)

    def uninstall_crds(self, names: Iterable[str]) -> None:
        uninstall_crds(self.rest, names)
        self.crds = [c for c in self.crds if c not in set(names)]

    @contextlib.contextmanager
    def without_crds(self, *names: str) -> Iterator[None]:
        """Temporarily remove CRDs (and every object of their kinds) so code can be
        tested on a cluster without Kubeflow/KServe; they are reinstalled after."""
        _check_crd_names(names)
        self.uninstall_crds(names)
        try:
            yield
        finally:
            self.install_crds(names)


def stop_processes(
    pids: Mapping[str, int], binaries: Mapping[str, str], procs: Mapping[str, subprocess.Popen], timeout: float
) -> None:
    """SIGTERM in reverse start order, SIGKILL what is left after `timeout`; only
    signals a pid whose command line still names the binary we started."""
    order = ["kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]
    names = sorted(pids, key=lambda n: order.index(n) if n in order else -1)
    for name in names:
        pid = pids[name]
        binary = binaries.get(name, name)
        if not _pid_alive(pid) or binary not in _cmdline(pid):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = procs.get(name)
            if proc is not None:
                if proc.poll() is not None:
                    break
            elif not _pid_alive(pid):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if name in procs:
                procs[name].wait(5)
    for proc in procs.values():  # reap
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _check_crd_names(names: Iterable[str]) -> None:
    bad = [n for n in names if n not in CRDS]
    if bad:
        raise ValueError(f"unknown CRD name(s) {bad}; choose from {sorted(CRDS)}")


def install_crds(rest: Rest, names: Iterable[str], timeout: float = 30.0) -> None:
    """Create (or replace) the CRDs and wait until the API server serves them."""
    names = list(names)
    _check_crd_names(names)
    install_crd_files(rest, {CRDS[short]: CRD_DIR / f"{CRDS[short]}.yaml" for short in names}, timeout)


def install_kwok_crds(rest: Rest, timeout: float = 30.0) -> None:
    """Install kwok's Logs and ClusterLogs CRDs (dev/kube/kwok-crds/), which kwok watches."""
    install_crd_files(rest, {crd: KWOK_CRD_DIR / f"kwok.x-k8s.io_{file}.yaml" for file, crd in KWOK_CRDS.items()},
                      timeout)


def install_crd_files(rest: Rest, files: Mapping[str, Path], timeout: float = 30.0) -> None:
    """Create (or replace) the CRDs {object name: file} and wait until the API server serves them."""
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for name, path in files.items():
        crd = yaml.safe_load(path.read_text())
        status, existing = rest.request("GET", f"{base}/{name}")
        if status == 200:
            if existing["metadata"].get("deletionTimestamp"):
                _wait_gone(rest, f"{base}/{name}", timeout)
            else:
                crd["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                rest.must("PUT", f"{base}/{name}", crd)
                continue
        rest.must("POST", base, crd)
    deadline = time.monotonic() + timeout
    for name in files:
        while True:
            crd = rest.must("GET", f"{base}/{name}")
            conds = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
            if conds.get("Established") == "True":
                break
            if conds.get("NamesAccepted") == "False":
                raise KubeHarnessError(f"CRD {name} names not accepted: {crd['status']}")
            if time.monotonic() > deadline:
                raise KubeHarnessError(f"CRD {name} not Established after {timeout} s: {conds}")
            time.sleep(0.1)
        # discovery must list the resource before clients can use it
        group, version = crd["spec"]["group"], crd["spec"]["versions"][0]["name"]
        plural = crd["spec"]["names"]["plural"]
        while True:
            status, disc = rest.request("GET", f"/apis/{group}/{version}")
            if status == 200 and any(r["name"] == plural for r in disc.get("resources", [])):
                break
            if time.monotonic() > deadline:
                raise KubeHarnessError(f"{group}/{version} {plural} not in discovery after {timeout} s")
            time.sleep(0.1)


def uninstall_crds(rest: Rest, names: Iterable[str], timeout: float = 60.0) -> None:
    """Delete the CRDs and wait until they are gone (their objects go with them)."""
    names = list(names)
    _check_crd_names(names)
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for short in names:
        rest.must("DELETE", f"{base}/{CRDS[short]}", ok=(200, 202, 404))
    deadline = time.monotonic() + timeout
    for short in names:
        _wait_gone(rest, f"{base}/{CRDS[short]}", timeout)
        # The API server's CRD handler and discovery lag behind the CRD object:
        # until they catch up, creates answer 403 "definition is terminating".
        spec = yaml.safe_load((CRD_DIR / f"{CRDS[short]}.yaml").read_text())["spec"]
        group, version, plural = spec["group"], spec["versions"][0]["name"], spec["names"]["plural"]
        while True:
            status, disc = rest.request("GET", f"/apis/{group}/{version}")
            listed = status == 200 and any(r["name"] == plural for r in disc.get("resources", []))
            if not listed and rest.request("GET", f"/apis/{group}/{version}/{plural}")[0] == 404:
                break
            if time.monotonic() > deadline:
                raise KubeHarnessError(f"{group}/{version} {plural} still served {timeout} s after deleting its CRD")
            time.sleep(0.1)


def _wait_gone(rest: Rest, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while rest.request("GET", path)[0] != 404:
        if time.monotonic() > deadline:
            raise KubeHarnessError(f"{path} still exists after {timeout} s")
        time.sleep(0.1)


def default_state_dir() -> Path:
    """State of the cluster started by `up`: $HUBML_KUBE_RUN_DIR or <tmp>/hubml-kube-<uid>."""
    env = os.environ.get("HUBML_KUBE_RUN_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"hubml-kube-{os.getuid()}"


def start_cluster(
    state_dir: Path | None = None,
    crds: Iterable[str] = tuple(CRDS),
    topology: Path | None = TOPOLOGY_FILE,
    detach: bool = False,
    timeout: float = 90.0,
    log: Any = None,
) -> KubeCluster:
    """Start etcd, kube-apiserver, controller-manager, scheduler and kwok on
    loopback, create the topology's nodes and install `crds`.

    `state_dir` (default: a new temp dir) holds PKI, etcd data, logs and
    state.json; it must not hold a running cluster. `detach=True` lets the
    processes outlive this Python process (the `up` command). On any failure
    everything started so far is stopped and the error names the process and
    the tail of its log.
    """
    crds = list(crds)
    _check_crd_names(crds)
    binaries = find_binaries()
    say = log or (lambda msg: None)
    t0 = time.monotonic()
    if state_dir is None:
        state_dir = Path(tempfile.mkdtemp(prefix="hubml-kube-"))
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    pki, logs = state_dir / "pki", state_dir / "logs"
    logs.mkdir(exist_ok=True)
    make_pki(pki)

    tokens = {name: secrets.token_hex(24) for name in ("admin", "controller-manager", "scheduler", "kwok")}
    (pki / "tokens.csv").write_text(
        f'{tokens["admin"]},hubml-admin,uid-admin,"system:masters"\n'
        # The controller-manager runs every controller under its own identity
        # (--use-service-account-credentials=false): minting ~40 controller
        # ServiceAccount tokens at start-up costs seconds on 2 cores, and tests
        # exercise RBAC of user workloads, not of the built-in controllers.
        f'{tokens["controller-manager"]},system:kube-controller-manager,uid-kcm,"system:masters"\n'
        f"{tokens['scheduler']},system:kube-scheduler,uid-sched\n"
        f'{tokens["kwok"]},kwok-controller,uid-kwok,"system:masters"\n'
    )
    os.chmod(pki / "tokens.csv", 0o600)
    ports = {n: free_port() for n in ("etcd", "etcd-peer", "apiserver", "kcm", "sched")}
    ports["kwok"] = free_port("0.0.0.0")  # kwok listens on every address (see kwok_configuration)
    server = f"https://127.0.0.1:{ports['apiserver']}"
    ca_pem = (pki / "ca.crt").read_bytes()
    kubeconfigs = {}
    for name, user in (("admin", "admin"), ("controller-manager", "system:kube-controller-manager"),
                       ("scheduler", "system:kube-scheduler"), ("kwok", "kwok-controller")):
        path = state_dir / ("kubeconfig" if name == "admin" else f"{name}.kubeconfig")
        path.write_text(yaml.safe_dump(kubeconfig_dict(server, ca_pem, tokens[name], user)))
        os.chmod(path, 0o600)
        kubeconfigs[name] = path

    cluster = KubeCluster(
        state_dir=state_dir,
        server=server,
        token=tokens["admin"],
        ca_file=pki / "ca.crt",
        kubeconfig=kubeconfigs["admin"],
        binaries={k: str(v) for k, v in binaries.items()},
        kwok_port=ports["kwok"],
    )
    kwok_config = state_dir / "kwok.yaml"
    kwok_config.write_text(yaml.safe_dump(kwok_configuration(ports["kwok"], pki / "kwok.crt", pki / "kwok.key")))

    def spawn(name: str, argv: list[str]) -> None:
        logf = open(logs / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(
                [str(binaries[name]), *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=state_dir,
                # `up` detaches them from the terminal; under pytest they stay in
                # its process group so a Ctrl-C reaches them too.
                start_new_session=detach,
            )
        finally:
            logf.close()
        cluster.pids[name] = proc.pid
        if not detach:
            cluster._procs[name] = proc
        cluster.save()

    def check_alive() -> None:
        for name, pid in cluster.pids.items():
            proc = cluster._procs.get(name)
            dead = proc.poll() is not None if proc is not None else not _pid_alive(pid)
            if dead:
                raise KubeHarnessError(
                    f"{name} exited during start-up; last lines of {logs / (name + '.log')}:\n"
                    + _log_tail(logs / f"{name}.log")
                )

    def wait(what: str, probe: Any, until: float) -> None:
        while True:
            check_alive()
            try:
                if probe():
                    return
            except (OSError, http.client.HTTPException, ssl.SSLError, KeyError, TypeError):
                pass
            if time.monotonic() > until:
                names = ", ".join(f"{logs / n}.log" for n in cluster.pids)
                raise KubeHarnessError(f"timed out after {timeout:.0f} s waiting for {what}; see {names}")
            time.sleep(0.1)

    deadline = t0 + timeout
    try:
        spawn("etcd", [
            "--name=default",
            f"--data-dir={state_dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
            f"--initial-cluster=default=http://127.0.0.1:{ports['etcd-peer']}",
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=8589934592",
            "--log-level=warn",
        ])
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"

        def etcd_ok() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", ports["etcd"], timeout=2)
            try:
                conn.request("GET", "/health")
                return json.loads(conn.getresponse().read()).get("health") == "true"
            finally:
                conn.close()

        wait("etcd /health", etcd_ok, deadline)
        say(f"etcd ready after {time.monotonic() - t0:.1f} s")

        spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--kubelet-preferred-address-types=InternalIP",
            "--enable-admission-plugins=NodeRestriction,ResourceQuota,LimitRanger,ServiceAccount,DefaultTolerationSeconds",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            f"--cert-dir={pki}",
        ])
        wait("kube-apiserver /readyz", cluster.is_healthy, deadline)
        say(f"kube-apiserver ready after {time.monotonic() - t0:.1f} s")
        # kwok watches its Logs/ClusterLogs objects from the start: their CRDs come first
        kwok_crd_errors: list[BaseException] = []

        def kwok_crd_job() -> None:
            try:
                install_kwok_crds(cluster.rest, timeout=max(5.0, deadline - time.monotonic()))
            except BaseException as exc:  # re-raised in the main thread below
                kwok_crd_errors.append(exc)

        kwok_crd_thread = threading.Thread(target=kwok_crd_job, name="hubml-kube-kwok-crds", daemon=True)
        kwok_crd_thread.start()

        spawn("kube-controller-manager", [
            f"--kubeconfig={kubeconfigs['controller-manager']}",
            f"--authentication-kubeconfig={kubeconfigs['controller-manager']}",
            f"--authorization-kubeconfig={kubeconfigs['controller-manager']}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['kcm']}",
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*",
            # client-side rate limits as kwokctl sets them: tests and the scale
            # mode should not queue behind the 20 QPS meant for big clusters
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            "--node-monitor-period=2s",
            f"--cert-dir={state_dir / 'kcm-certs'}",
        ])
        spawn("kube-scheduler", [
            f"--kubeconfig={kubeconfigs['scheduler']}",
            f"--authentication-kubeconfig={kubeconfigs['scheduler']}",
            f"--authorization-kubeconfig={kubeconfigs['scheduler']}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['sched']}",
            "--leader-elect=false",
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            f"--cert-dir={state_dir / 'sched-certs'}",
        ])
        kwok_crd_thread.join(max(1.0, deadline - time.monotonic()))
        if kwok_crd_thread.is_alive():
            raise KubeHarnessError(f"kwok's CRDs not established within {timeout:.0f} s")
        if kwok_crd_errors:
            raise kwok_crd_errors[0]
        say(f"kwok CRDs established after {time.monotonic() - t0:.1f} s")
        spawn("kwok", [
            f"--kubeconfig={kubeconfigs['kwok']}",
            f"--config={STAGES_FILE}",
            f"--config={kwok_config}",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION[0]}={KWOK_NODE_ANNOTATION[1]}",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.1/16",
            "--node-ip=127.0.1.1",
        ])

        rest = cluster.rest
        if topology is not None:
            topo = load_topology(topology)
            nodes = topology_nodes(topo)
            for node in nodes:
                status, payload = rest.request("POST", "/api/v1/nodes", node)
                if status not in (200, 201):
                    raise KubeHarnessError(f"creating node {node['metadata']['name']}: {status} {payload}")
        # CRDs are installed while the controllers and kwok come up (independent waits).
        crd_errors: list[BaseException] = []

        def crd_job() -> None:
            try:
                install_crds(rest, crds, timeout=max(5.0, deadline - time.monotonic()))
                say(f"CRDs {', '.join(crds)} established after {time.monotonic() - t0:.1f} s")
            except BaseException as exc:  # re-raised in the main thread below
                crd_errors.append(exc)

        crd_thread = threading.Thread(target=crd_job, name="hubml-kube-crds", daemon=True)
        if crds:
            crd_thread.start()

        def components_ok() -> bool:
            ok = True
            for port in (ports["kcm"], ports["sched"]):
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=ssl._create_unverified_context())
                try:
                    conn.request("GET", "/healthz")
                    ok = ok and conn.getresponse().status == 200
                finally:
                    conn.close()
            return ok

        wait("kube-controller-manager and kube-scheduler /healthz", components_ok, deadline)
        say(f"controller-manager and scheduler healthy after {time.monotonic() - t0:.1f} s")

        def default_sa() -> bool:
            return rest.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

        wait("the default ServiceAccount (controller-manager)", default_sa, deadline)
        say(f"default ServiceAccount after {time.monotonic() - t0:.1f} s")
        if topology is not None:
            want = {n["metadata"]["name"] for n in nodes}
            wait("simulated nodes Ready and untainted (kwok + node lifecycle controller)",
                 lambda: _nodes_schedulable(rest, want), deadline)
        say(f"nodes ready after {time.monotonic() - t0:.1f} s")
        kwok_ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))

        def kwok_server_ok() -> bool:
            conn = http.client.HTTPSConnection("127.0.0.1", ports["kwok"], timeout=2, context=kwok_ctx)
            try:
                conn.request("GET", "/healthz")
                return conn.getresponse().status == 200
            finally:
                conn.close()

        wait("kwok's server /healthz (HTTPS, cluster CA)", kwok_server_ok, deadline)
        if crds:
            crd_thread.join(max(1.0, deadline - time.monotonic()))
            if crd_thread.is_alive():
                raise KubeHarnessError(f"CRDs not established within {timeout:.0f} s")
            if crd_errors:
                raise crd_errors[0]
            cluster.crds = list(crds)
        cluster.save()
        return cluster
    except BaseException:
        stop_processes(cluster.pids, cluster.binaries, cluster._procs, 10.0)
        cluster.pids.clear()
        cluster.save()
        raise


def _nodes_schedulable(rest: Rest, names: set[str]) -> bool:
    """True when every named node is Ready and has lost the not-ready taint."""
    status, payload = rest.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")
    if status != 200:
        return False
    ready = set()
    for node in payload["items"]:
        conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        taints = {t["key"] for t in node.get("spec", {}).get("taints") or []}
        if conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints:
            ready.add(node["metadata"]["name"])
    return names <= ready


# --------------------------------------------------------------------------
# scale mode (benchmarks)
# --------------------------------------------------------------------------


def scale_up(
    cluster: KubeCluster,
    nodes: int = 1000,
    pods: int = 20000,
    namespace: str | None = None,
    workers: int = 16,
    log: Any = None,
) -> dict[str, float]:
    """Add `nodes` simulated nodes and `pods` pods bound to them (spec.nodeName).

    For benchmarks that need a cluster the size of a real ML platform. Returns
    timings {"nodes_s", "pods_s", "nodes", "pods"}. Objects that already exist
    are left as they are, so calling it twice is safe.
    """
    say = log or (lambda msg: None)
    topo = load_topology()
    namespace = namespace or topo["scale"]["namespace"]
    rest = cluster.rest
    node_objs = scale_nodes(topo, nodes)

    def create(path: str, obj: dict[str, Any]) -> None:
        status, payload = rest.request("POST", path, obj)
        if status not in (200, 201, 409):
            raise KubeHarnessError(f"POST {path} {obj['metadata']['name']}: {status} {payload}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda n: create("/api/v1/nodes", n), node_objs))
    t_nodes = time.monotonic() - t0
    say(f"{nodes} nodes created in {t_nodes:.1f} s")
    create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    deadline = time.monotonic() + 60
    while rest.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default")[0] != 200:
        if time.monotonic() > deadline:
            raise KubeHarnessError(f"no default ServiceAccount in {namespace} after 60 s")
        time.sleep(0.1)
    pod_objs = scale_pods([n["metadata"]["name"] for n in node_objs], pods, namespace)
    t1 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda p: create(f"/api/v1/namespaces/{namespace}/pods", p), pod_objs))
    t_pods = time.monotonic() - t1
    say(f"{pods} pods created in {t_pods:.1f} s")
    return {"nodes_s": t_nodes, "pods_s": t_pods, "nodes": float(nodes), "pods": float(pods)}


def scale_down(cluster: KubeCluster, namespace: str | None = None, timeout: float = 120.0) -> None:
    """Remove what scale_up added: its namespace (and pods) and every scale node."""
    topo = load_topology()
    namespace = namespace or topo["scale"]["namespace"]
    rest = cluster.rest
    # Pods first, while kwok still manages their nodes and removes them at
    # once; pods left on deleted nodes would wait for the pod GC instead.
    rest.must("DELETE", f"/api/v1/namespaces/{namespace}", ok=(200, 202, 404))
    _wait_gone(rest, f"/api/v1/namespaces/{namespace}", timeout)
    selector = urllib.parse.quote(f"{SCALE_LABEL}=true")
    rest.must("DELETE", f"/api/v1/nodes?labelSelector={selector}", ok=(200,))


# --------------------------------------------------------------------------
# command line (dev/kube-up, dev/kube-down)
# --------------------------------------------------------------------------


def _running_cluster(state_dir: Path) -> KubeCluster | None:
    if not (state_dir / STATE_FILE).is_file():
        return None
    with contextlib.suppress(KubeHarnessError, KeyError):
        cluster = KubeCluster.load(state_dir)
        if cluster.pids and all(_pid_alive(p) for p in cluster.pids.values()) and cluster.is_healthy():
            return cluster
    return None


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kube_cluster.py",
        description="Start/stop the hubml test Kubernetes control plane (etcd, kube-apiserver, "
        "controller-manager, scheduler, kwok GPU nodes) on loopback.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=None,
                        help="where PKI, etcd data, logs and the kubeconfig live "
                        "(default $HUBML_KUBE_RUN_DIR or <tmp>/hubml-kube-<uid>)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", parents=[common], help="start (or reuse) the control plane; print the KUBECONFIG path on stdout")
    up.add_argument("--without-crd", action="append", default=[], choices=sorted(CRDS),
                    help="do not install this CRD (repeatable)")
    sub.add_parser("down", parents=[common], help="stop the control plane and remove its state")
    sub.add_parser("status", parents=[common], help="say whether it runs; print the KUBECONFIG path if so")
    sc = sub.add_parser("scale", parents=[common], help="add scale-mode nodes and pods to the running control plane")
    sc.add_argument("--nodes", type=int, default=1000)
    sc.add_argument("--pods", type=int, default=20000)
    args = parser.parse_args(argv)
    state_dir: Path = (args.state_dir or default_state_dir()).resolve()

    if args.cmd == "up":
        running = _running_cluster(state_dir)
        if running:
            _err(f"control plane already running ({running.server})")
            print(running.kubeconfig)
            return 0
        if (state_dir / STATE_FILE).exists():  # stale: stop leftovers, start clean
            with contextlib.suppress(KubeHarnessError):
                stale = KubeCluster.load(state_dir)
                stop_processes(stale.pids, stale.binaries, {}, 10.0)
            shutil.rmtree(state_dir, ignore_errors=True)
        t0 = time.monotonic()
        crds = [c for c in CRDS if c not in args.without_crd]
        try:
            cluster = start_cluster(state_dir, crds=crds, detach=True, log=_err)
        except KubeHarnessError as exc:
            _err(f"kube-up failed: {exc}")
            return 1
        _err(f"control plane up in {time.monotonic() - t0:.1f} s at {cluster.server}; "
             f"CRDs: {', '.join(cluster.crds) or 'none'}")
        _err(f"use it with: export KUBECONFIG={cluster.kubeconfig}  (stop: dev/kube-down)")
        print(cluster.kubeconfig)
        return 0
    if args.cmd == "down":
        if not (state_dir / STATE_FILE).exists():
            _err(f"no control plane state in {state_dir}; nothing to stop")
            shutil.rmtree(state_dir, ignore_errors=True)
            return 0
        cluster = KubeCluster.load(state_dir)
        pids = dict(cluster.pids)
        cluster.stop()
        left = [f"{n} (pid {p})" for n, p in pids.items() if _pid_alive(p)]
        if left:
            _err(f"could not stop: {', '.join(left)}")
            return 1
        _err(f"control plane in {state_dir} stopped")
        return 0
    if args.cmd == "status":
        running = _running_cluster(state_dir)
        if running:
            print(running.kubeconfig)
            return 0
        _err(f"no healthy control plane in {state_dir}")
        return 1
    if args.cmd == "scale":
        running = _running_cluster(state_dir)
        if not running:
            _err(f"no healthy control plane in {state_dir}; run dev/kube-up first")
            return 1
        if args.nodes < 1 or args.pods < 0:
            _err("--nodes must be >= 1 and --pods >= 0")
            return 2
        res = scale_up(running, args.nodes, args.pods, log=_err)
        print(json.dumps(res))
        return 0
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":
    sys.exit(main())
