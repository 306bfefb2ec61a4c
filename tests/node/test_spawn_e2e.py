"""A real single-user server (issue 11): a user logs in to JupyterHub (with
configurable-http-proxy), picks the CPU profile in the spawn form, HubMLSpawner creates a
pod of the single-user image on the real node, the server in it registers with the hub,
answers through the proxy after the OAuth round trip, and a kernel started there has
hubml's magics loaded (the image's IPython config). Nothing in between is simulated."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hubml_testing.kube_node import GATEWAY_IP
from hubml_testing.jupyterhub import Browser, xsrf
from hubml_testing.pod_kernel import execute, start_kernel
from hubml_testing.real_pods import REAL_PROFILE, SINGLEUSER, user_pods

pytestmark = [pytest.mark.kube, pytest.mark.hub, pytest.mark.node, pytest.mark.slow, pytest.mark.timeout(900)]

PROFILES = [{**REAL_PROFILE, "default": True},
            {"name": "a100", "display": "1 × A100 80GB", "gpu": {"model": "A100-SXM4-80GB", "count": 1}}]

KERNEL_CHECK = """\
import os, socket
ip = get_ipython()
print("host", socket.gethostname())
print("magics", sorted(m for m in ("train", "register_model", "deploy") if m in {**ip.magics_manager.magics["cell"], **ip.magics_manager.magics["line"]}))
print("ext", "hubml" in ip.extension_manager.loaded)
print("user", os.getuid(), os.environ["JUPYTERHUB_USER"], os.environ["JUPYTERHUB_API_URL"])
"""


async def test_user_spawns_a_real_server_and_its_kernel_has_the_magics(
        real_node, singleuser_on_node, kube_cluster, kube_namespace, jupyterhub_factory):
    hub = jupyterhub_factory(config={
        "JupyterHub.spawner_class": "hubml",
        # the pod reaches the hub API at the node's address (the only host address pods reach)
        "JupyterHub.hub_ip": GATEWAY_IP,
        "HubMLSpawner.namespace": kube_namespace,
        "HubMLSpawner.image": singleuser_on_node,
        "HubMLSpawner.image_pull_policy": "Never",
        "HubMLSpawner.start_timeout": 300,
        "HubMLSpawner.http_timeout": 300,
        "HubMLSpawner.gpu_profiles": PROFILES,
    }, users=["alice"], env={"KUBECONFIG": str(kube_cluster.kubeconfig)})
    browser = Browser(hub.url)
    browser.login("alice")
    _, _, form = await asyncio.to_thread(browser.get, "hub/spawn")
    assert 'value="cpu-real"' in form and "CPU on the real node" in form, form[:3000]

    started = time.monotonic()
    await asyncio.to_thread(browser.post_form, "hub/spawn", {"profile": "cpu-real", "_xsrf": xsrf(form)})

    async def ready() -> dict[str, Any] | None:
        server = (await asyncio.to_thread(hub.servers, "alice")).get("")
        if server and server.get("ready"):
            return server
        assert server and server.get("pending") == "spawn", f"the spawn ended without a server:\n{hub.log_tail()}"
        return None

    deadline = time.monotonic() + 300
    while not await ready():
        assert time.monotonic() < deadline, f"alice's server not ready in 300 s:\n{hub.log_tail()}"
        await asyncio.sleep(1)
    spawn_s = time.monotonic() - started

    [pod] = user_pods(kube_cluster, kube_namespace, "alice")
    assert pod["spec"]["nodeName"] == real_node.name
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["containers"][0]["image"] == SINGLEUSER
    assert pod["metadata"]["labels"]["hubml.io/profile"] == "cpu-real"

    # the page a user lands on, through the proxy with the browser's cookies: the server sends
    # the browser through the hub's OAuth (pod -> hub API at the node's address) and back
    status, final_url, body = await asyncio.to_thread(browser.get, "user/alice/lab")
    assert status == 200 and final_url.endswith("/user/alice/lab"), (status, final_url, body[:500])
    assert "jupyter-config-data" in body, body[:2000]

    token = hub.create_token("alice", scopes=["access:servers!user=alice"])
    kernel = await asyncio.to_thread(start_kernel, hub.url, "alice", token)
    out, status = await execute(kernel, KERNEL_CHECK)
    assert status == "ok", out
    assert f"host {pod['metadata']['name']}" in out, out  # it ran in the pod, not on the host
    assert "magics ['deploy', 'register_model', 'train']" in out and "ext True" in out, out
    assert f"user 1000 alice http://{GATEWAY_IP}:" in out, out
    print(f"spawn to ready: {spawn_s:.1f} s")

    hub.stop_server("alice", timeout=120)
    deadline = time.monotonic() + 120
    while user_pods(kube_cluster, kube_namespace, "alice"):
        assert time.monotonic() < deadline, "alice's pod outlived her stopped server"
        await asyncio.sleep(1)
