"""Container logs in the test control plane: ``GET pods/<pod>/log`` (what ``kubectl logs`` calls)
through the real kube-apiserver, served by kwok from a file named in a kwok ``Logs`` object.

The API server dials the pod's node at its InternalIP (127.0.1.x) and the port
of its status.daemonEndpoints.kubeletEndpoint, which is kwok's server; see
``KubeCluster.serve_logs`` and ``kwok_configuration``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from hubml_testing.kube import wait_for
from hubml_testing.kube_cluster import KubeCluster
from hubml_testing.kwok import append_container_log, cri_log_lines, kwok_configuration, logs_manifest

pytestmark = pytest.mark.kube


def pod(name: str, containers: tuple[str, ...] = ("main",)) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": c, "image": "registry.invalid/hubml/worker:1"} for c in containers],
        },
    }


async def running_pod(core: client.CoreV1Api, ns: str, name: str, containers: tuple[str, ...] = ("main",)) -> Any:
    await core.create_namespaced_pod(ns, pod(name, containers))

    async def running() -> Any:
        p = await core.read_namespaced_pod(name, ns)
        return p if p.status.phase == "Running" else None

    return await wait_for(running, what=f"pod {ns}/{name} Running")


async def raw_log(core: client.CoreV1Api, ns: str, name: str, **kw: Any) -> str:
    """The log exactly as the API server sends it (the client's own decoding would parse JSON-looking text)."""
    resp = await core.read_namespaced_pod_log(name, ns, _preload_content=False, **kw)
    try:
        assert resp.status == 200, await resp.text()
        return (await resp.read()).decode()
    finally:
        resp.release()


# --- pure parts --------------------------------------------------------------


def test_cri_records_are_what_the_kubelet_reads() -> None:
    at = datetime.datetime(2026, 11, 24, 5, 6, 7, 123456, tzinfo=datetime.timezone.utc)
    assert cri_log_lines(["a b", ""], at=at) == (
        "2026-11-24T05:06:07.123456000Z stdout F a b\n2026-11-24T05:06:07.123456000Z stdout F \n"
    )
    assert cri_log_lines(["x", "half"], "stderr", partial=True, at=at).splitlines() == [
        "2026-11-24T05:06:07.123456000Z stderr F x", "2026-11-24T05:06:07.123456000Z stderr P half"]


@pytest.mark.parametrize("args, fragment", [
    ((["two\nlines"],), "without newlines"),
    ((["ok", "crlf\r\n"],), "without newlines"),
    (([b"bytes"],), "without newlines"),
    ((["ok"], "stdin"), "stream must be"),
])
def test_cri_lines_refuse_bad_input(args: tuple, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        cri_log_lines(*args)


@pytest.mark.parametrize("namespace, pod_name", [("Bad_NS", "p"), ("ns", ""), ("ns", "-p"), ("ns", None),
                                                 ("ns", "a" * 254)])
def test_logs_manifest_refuses_bad_names(namespace: Any, pod_name: Any) -> None:
    with pytest.raises(ValueError, match="must be a Kubernetes object name"):
        logs_manifest(namespace, pod_name, [])


def test_kwok_configuration_serves_logs_on_one_port(tmp_path: Path) -> None:
    conf = kwok_configuration(40123, tmp_path / "c.crt", tmp_path / "c.key")
    opts = conf["options"]
    assert conf["kind"] == "KwokConfiguration"
    assert opts["serverAddress"] == "0.0.0.0:40123" and opts["nodePort"] == 40123
    assert set(opts["enableCRDs"]) == {"Logs", "ClusterLogs"}
    assert opts["enableDebuggingHandlers"] is True and opts["enableProfilingHandler"] is False
    assert opts["tlsCertFile"].endswith("c.crt") and opts["nodeLeaseParallelism"] > 0
    for bad in (0, 70000, -1):
        with pytest.raises(ValueError, match="port"):
            kwok_configuration(bad, tmp_path / "c.crt", tmp_path / "c.key")


# --- through the API server ----------------------------------------------------


async def test_every_node_advertises_kwoks_server_on_loopback(kube_api: Any, kube_cluster: KubeCluster) -> None:
    core = client.CoreV1Api(kube_api)
    nodes = (await core.list_node(label_selector="type=kwok")).items
    assert nodes and kube_cluster.kwok_port
    for node in nodes:
        assert node.status.daemon_endpoints.kubelet_endpoint.port == kube_cluster.kwok_port, node.metadata.name
        assert all(ipaddress.ip_address(a.address).is_loopback
                   for a in node.status.addresses if a.type == "InternalIP"), node.metadata.name
    # kwok's certificate is the cluster CA's and names the node's address, so the API server
    # may verify it (--kubelet-certificate-authority) as well as not
    ctx = ssl.create_default_context(cafile=str(kube_cluster.ca_file))
    ip = next(a.address for a in nodes[0].status.addresses if a.type == "InternalIP")

    def handshake() -> dict:
        with socket.create_connection((ip, kube_cluster.kwok_port), timeout=10) as sock:
            with ctx.wrap_socket(sock, server_hostname=ip) as tls:
                return tls.getpeercert()

    cert = await asyncio.to_thread(handshake)
    assert ("IP Address", ip) in cert["subjectAltName"]


async def test_pod_log_returns_the_files_content(kube_api: Any, kube_cluster: KubeCluster, kube_namespace: str,
                                                 tmp_path: Path) -> None:
    core = client.CoreV1Api(kube_api)
    await running_pod(core, kube_namespace, "worker")
    path = tmp_path / "worker.log"
    append_container_log(path, ["step 1 loss=0.9", "ünïcode ✓", '{"loss": 0.5}'])
    append_container_log(path, ["a warning"], stream="stderr")
    await asyncio.to_thread(kube_cluster.serve_logs, kube_namespace, "worker", path)

    text = await raw_log(core, kube_namespace, "worker")
    assert text == 'step 1 loss=0.9\nünïcode ✓\n{"loss": 0.5}\na warning\n'
    assert await raw_log(core, kube_namespace, "worker", tail_lines=1) == "a warning\n"
    stamped = (await raw_log(core, kube_namespace, "worker", timestamps=True)).splitlines()
    assert len(stamped) == 4 and stamped[0].endswith(" step 1 loss=0.9") and stamped[0][:4].isdigit()

    # appended later: the next read has it (no restart, no new object)
    append_container_log(path, ["step 2 loss=0.7"])
    assert (await raw_log(core, kube_namespace, "worker")).endswith("a warning\nstep 2 loss=0.7\n")
    # a partial record (the process has not written its newline yet) comes without one
    append_container_log(path, ["step 3 lo"], partial=True)
    assert (await raw_log(core, kube_namespace, "worker")).endswith("step 2 loss=0.7\nstep 3 lo")


async def test_pod_log_follow_streams_lines_as_they_are_written(kube_api: Any, kube_cluster: KubeCluster,
                                                                kube_namespace: str, tmp_path: Path) -> None:
    core = client.CoreV1Api(kube_api)
    await running_pod(core, kube_namespace, "live")
    path = tmp_path / "live.log"
    append_container_log(path, ["first"])
    await asyncio.to_thread(kube_cluster.serve_logs, kube_namespace, "live", path)
    resp = await core.read_namespaced_pod_log("live", kube_namespace, follow=True, _preload_content=False)
    try:
        assert resp.status == 200
        assert await asyncio.wait_for(resp.content.readline(), 30) == b"first\n"
        for i in range(3):  # each line reaches the open stream after it is written
            append_container_log(path, [f"live {i}"])
            assert await asyncio.wait_for(resp.content.readline(), 30) == f"live {i}\n".encode()
    finally:
        resp.close()


async def test_each_container_gets_its_own_file(kube_api: Any, kube_cluster: KubeCluster, kube_namespace: str,
                                                tmp_path: Path) -> None:
    core = client.CoreV1Api(kube_api)
    await running_pod(core, kube_namespace, "two", containers=("trainer", "sidecar"))
    for c in ("trainer", "sidecar"):
        append_container_log(tmp_path / f"{c}.log", [f"I am {c}"])
        await asyncio.to_thread(kube_cluster.serve_logs, kube_namespace, "two", tmp_path / f"{c}.log", container=c)
    assert await raw_log(core, kube_namespace, "two", container="trainer") == "I am trainer\n"
    assert await raw_log(core, kube_namespace, "two", container="sidecar") == "I am sidecar\n"
    logs_obj = await client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        "kwok.x-k8s.io", "v1alpha1", kube_namespace, "logs", "two")
    assert sorted(e["containers"][0] for e in logs_obj["spec"]["logs"]) == ["sidecar", "trainer"]


async def test_a_pod_without_a_log_file_says_so(kube_api: Any, kube_cluster: KubeCluster,
                                                kube_namespace: str, tmp_path: Path) -> None:
    core = client.CoreV1Api(kube_api)
    await running_pod(core, kube_namespace, "quiet")
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod_log("quiet", kube_namespace)
    assert err.value.status == 400 and "no logs found" in str(err.value.body)
    # serve_logs refuses what cannot be a log file, and creates nothing
    with pytest.raises(ValueError, match="directory"):
        await asyncio.to_thread(kube_cluster.serve_logs, kube_namespace, "quiet", tmp_path)
    with pytest.raises(ValueError, match="Kubernetes object name"):
        await asyncio.to_thread(kube_cluster.serve_logs, kube_namespace, "Not_A_Pod", tmp_path / "x.log")
    assert not (tmp_path / "x.log").exists()
    listed = await client.CustomObjectsApi(kube_api).list_namespaced_custom_object(
        "kwok.x-k8s.io", "v1alpha1", kube_namespace, "logs")
    assert listed["items"] == []
