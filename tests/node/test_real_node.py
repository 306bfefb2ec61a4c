"""The real node itself: pods start in containerd, get an address on the bridge, resolve
a peer's `<pod>.<headless-service>` name through CoreDNS and reach a ClusterIP Service
through kube-proxy, while nothing can leave the machine (issue 11)."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from hubml_testing.kube import wait_for
from hubml_testing.kube_node import (
    BLACKHOLES,
    BRIDGE,
    BRIDGE_MAC,
    GATEWAY_IP,
    REAL_NODE_TOLERATION,
    bridge_mac,
    guard_problems,
)
from hubml_testing.node_images import BUSYBOX_IMAGE

pytestmark = [pytest.mark.kube, pytest.mark.node]


def busybox_pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"hubml.io/node": "real"},
            "tolerations": [REAL_NODE_TOLERATION],
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                            "command": ["/bin/sh", "-c", script]}],
            **spec,
        },
    }


async def _phase(core: Any, ns: str, name: str) -> str:
    return (await core.read_namespaced_pod(name, ns)).status.phase


async def finished(core: Any, ns: str, name: str, timeout: float = 90) -> str:
    await wait_for(lambda: _done(core, ns, name), timeout=timeout, what=f"pod {name} to finish")
    return await _phase(core, ns, name)


async def _done(core: Any, ns: str, name: str) -> bool:
    return await _phase(core, ns, name) in ("Succeeded", "Failed")


def test_network_guard_is_in_place(real_node):
    assert guard_problems() == []
    for cidr in BLACKHOLES:
        probe = ".".join(cidr.split(".")[:2]) + ".200.77"  # outside the bridge's own 10.245.0.0/24
        got = subprocess.run(["ip", "route", "get", probe], capture_output=True, text=True)
        assert got.returncode != 0, f"host has a route for {probe} in {cidr}: {got.stdout}"
    # from the bridge, only the bridge subnet is routable: no way out for a pod's packet
    escape = subprocess.run(["ip", "route", "get", "192.0.2.77", "from", "10.245.0.50", "iif", BRIDGE],
                            capture_output=True, text=True)
    assert escape.returncode != 0, escape.stdout
    peer = subprocess.run(["ip", "route", "get", "10.245.0.20", "from", "10.245.0.50", "iif", BRIDGE],
                          capture_output=True, text=True, check=True)
    assert f"dev {BRIDGE}" in peer.stdout
    nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True).stdout
    assert not [line for line in nat.splitlines() if "MASQUERADE" in line and "10.245." in line and "-s" in line
                and "KUBE" not in line], nat


async def test_the_bridge_keeps_its_mac_as_pods_come_and_go(real_node, kube_api, kube_namespace):
    """A bridge's MAC follows its lowest-numbered port unless set: pods' cached ARP entry
    for the gateway then pointed nowhere for seconds after another pod came or went."""
    from kubernetes_asyncio import client

    core = client.CoreV1Api(kube_api)
    seen = {bridge_mac()}
    for i in range(3):
        await core.create_namespaced_pod(kube_namespace, busybox_pod(f"churn-{i}", "echo up"))
        assert await finished(core, kube_namespace, f"churn-{i}") == "Succeeded"
        seen.add(bridge_mac())
        await core.delete_namespaced_pod(f"churn-{i}", kube_namespace, grace_period_seconds=0)
        await wait_for(lambda i=i: _gone(core, kube_namespace, f"churn-{i}"), timeout=60, what=f"pod churn-{i} gone")
        seen.add(bridge_mac())
    assert seen == {BRIDGE_MAC}


async def _gone(core: Any, ns: str, name: str) -> bool:
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        await core.read_namespaced_pod(name, ns)
    except ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


async def test_pods_resolve_peers_and_reach_a_service(real_node, kube_api, kube_namespace):
    from kubernetes_asyncio import client

    core = client.CoreV1Api(kube_api)
    ns = kube_namespace
    await core.create_namespaced_service(ns, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers"},
        "spec": {"clusterIP": "None", "selector": {"app": "srv"}, "ports": [{"port": 8080}]},
    })
    await core.create_namespaced_service(ns, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "srv"}, "ports": [{"port": 80, "targetPort": 8080}]},
    })
    server = busybox_pod("srv", "mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
                         hostname="srv", subdomain="peers")
    server["spec"]["restartPolicy"] = "Always"
    server["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    await core.create_namespaced_pod(ns, server)
    pod = await wait_for(lambda: _ready(core, ns, "srv"), timeout=90, what="the busybox server pod Ready")
    assert pod.spec.node_name == real_node.name
    assert pod.status.pod_ip.startswith("10.245.0.")
    script = (
        f"set -e; nslookup srv.peers.{ns}.svc.cluster.local {GATEWAY_IP}; "
        f"wget -qO- http://srv.peers.{ns}.svc.cluster.local:8080/ | sed 's/^/headless: /'; "
        "wget -qO- http://web/ | sed 's/^/service: /'; "
        "if nslookup pypi.org >/dev/null 2>&1; then echo 'outside name resolved'; exit 3; fi; echo done"
    )
    await core.create_namespaced_pod(ns, busybox_pod("client", script))
    phase = await finished(core, ns, "client")
    log = await core.read_namespaced_pod_log("client", ns)
    assert phase == "Succeeded", log
    assert "headless: srv" in log and "service: srv" in log and log.rstrip().endswith("done"), log


async def _ready(core: Any, ns: str, name: str) -> Any:
    pod = await core.read_namespaced_pod(name, ns)
    conds = {c.type: c.status for c in pod.status.conditions or []}
    return pod if conds.get("Ready") == "True" else None


async def test_failing_container_reports_its_exit_code(real_node, kube_api, kube_namespace):
    from kubernetes_asyncio import client

    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(kube_namespace, busybox_pod("fails", "echo about to fail; exit 7"))
    assert await finished(core, kube_namespace, "fails") == "Failed"
    pod = await core.read_namespaced_pod("fails", kube_namespace)
    assert pod.status.container_statuses[0].state.terminated.exit_code == 7
    assert "about to fail" in await core.read_namespaced_pod_log("fails", kube_namespace)


async def test_gpu_request_is_placed_on_the_real_node(real_node, kube_api, kube_namespace):
    from kubernetes_asyncio import client

    core = client.CoreV1Api(kube_api)
    pod = busybox_pod("gpu", "echo ok")
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    await core.create_namespaced_pod(kube_namespace, pod)
    assert await finished(core, kube_namespace, "gpu") == "Succeeded"
    too_many = busybox_pod("gpu3", "echo never")
    too_many["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "3"}}
    await core.create_namespaced_pod(kube_namespace, too_many)

    async def unschedulable() -> bool:
        p = await core.read_namespaced_pod("gpu3", kube_namespace)
        return any(c.reason == "Unschedulable" for c in p.status.conditions or [])

    await wait_for(unschedulable, timeout=60, what="a 3-GPU pod to be Unschedulable on a 2-GPU node")
