"""Pure manifest building for the test control plane, no I/O beyond reading the topology file:
nodes of dev/kube/topology.yaml, scale-mode nodes and pods, kubeconfigs and the kwok
pod-outcome annotations (the contract of dev/kube/kwok-stages.yaml)."""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from hubml_testing.kube_binaries import KUBE_DEV_DIR, KubeHarnessError

TOPOLOGY_FILE = KUBE_DEV_DIR / "topology.yaml"

#: the InternalIPs of the topology nodes (node_ip); kwok's serving certificate covers all of them
NODE_NETWORK = "127.0.1.0/24"

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
