"""The culler against real kernels in real single-user pods (issue 11).

JupyterHub (with configurable-http-proxy) spawns alice's and bob's servers with
HubMLSpawner on the real node, each holding one of the node's advertised GPUs
(profile ``gpu-real``). A DCGM exporter stand-in reports those GPUs idle (nothing on
the node touches a GPU), a real Prometheus scrapes it, and hubml's culler reads the
hub, each server's own kernels through the proxy (as the ``hubml-culler`` service,
with the README's scopes) and Prometheus, as it does in a cluster. At short, scaled
timeouts (idle_timeout 30 s for 30 min, GPU-idle window 10 s):

- alice starts a cell that loops forever and closes her tab: the forgotten loop. Her
  kernel stays busy, so Jupyter's activity alone would keep her server for ever; the
  culler stops it ``idle_timeout`` after it first found the loop unattended
  (reason ``gpu-idle``) and KubeSpawner removes the pod.
- bob runs a cell that prints for longer than the timeout, with his tab open, and his
  GPU idle too: someone at work. He is kept all along, and his server is culled only
  ``idle_timeout`` after his cell's last output (reason ``idle``), never before.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import pytest
import yaml
from hubml.culler.app import CullerApp
from hubml.culler.policy import Action
from hubml_testing.dcgm import NodeDcgmExporter
from hubml_testing.kube import wait_for
from hubml_testing.kube_node import GATEWAY_IP, node_summary, ready_for_gpu_pods
from hubml_testing.pod_kernel import execute, start_kernel, submit_and_leave
from hubml_testing.real_pods import GPU_REAL_PROFILE, user_pods

pytestmark = [pytest.mark.kube, pytest.mark.hub, pytest.mark.node, pytest.mark.slow, pytest.mark.timeout(900)]

IDLE_TIMEOUT = 30.0  # s, the profile's idle_timeout
GPU_WINDOW = 10.0  # s, the culler's GPU-idle window
PASS_EVERY = 2.0  # s between culler passes
PRINT_FOR = 40  # s bob's cell prints for: longer than the timeout
CULLER = "hubml-culler"
#: the culler's scopes as the README documents them (least privilege)
CULLER_SCOPES = ["list:users", "read:servers", "delete:servers", "access:servers"]
PROFILE = {**GPU_REAL_PROFILE, "idle_timeout": f"{IDLE_TIMEOUT:g}s", "default": True}

FORGOTTEN_LOOP = "import time\nwhile True:\n    time.sleep(0.5)\n"
PRINTING_CELL = f"import time\nfor i in range({PRINT_FOR}):\n    print('step', i, flush=True)\n    time.sleep(1)\n"


class PassLog:
    """Every pass's decision per user, with the wall time the pass started."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, str, str, str]] = []  # (t, user, action, reason)

    def add(self, t: float, report: Any) -> None:
        for o in report.outcomes:
            self.rows.append((t, o.user, o.decision.action.value, o.decision.reason))

    def of(self, user: str) -> list[tuple[float, str, str]]:
        return [(t, a, r) for t, u, a, r in self.rows if u == user]

    def cull(self, user: str) -> tuple[float, str] | None:
        return next(((t, r) for t, a, r in self.of(user) if a == Action.CULL.value), None)

    def show(self, user: str, since: float) -> str:
        return ", ".join(f"{t - since:+.1f}s {a}/{r}" for t, a, r in self.of(user))


async def test_forgotten_loop_is_culled_and_a_user_at_work_is_not(
        real_node, singleuser_on_node, kube_cluster, kube_namespace, jupyterhub_factory, prometheus_factory,
        tmp_path):
    culler_token = secrets.token_hex(16)
    hub = jupyterhub_factory(config={
        "JupyterHub.spawner_class": "hubml",
        "JupyterHub.hub_ip": GATEWAY_IP,  # the pods reach the hub API at the node's address
        "JupyterHub.services": [{"name": CULLER, "api_token": culler_token}],
        "JupyterHub.load_roles": [{"name": CULLER, "scopes": CULLER_SCOPES, "services": [CULLER]}],
        "HubMLSpawner.namespace": kube_namespace,
        "HubMLSpawner.image": singleuser_on_node,
        "HubMLSpawner.image_pull_policy": "Never",
        "HubMLSpawner.start_timeout": 300,
        "HubMLSpawner.http_timeout": 300,
        "HubMLSpawner.gpu_profiles": [PROFILE],
    }, users=["alice", "bob"], env={"KUBECONFIG": str(kube_cluster.kubeconfig)})

    exporter = NodeDcgmExporter(kube_cluster.rest, real_node.name)
    try:
        await _scenario(hub, exporter, culler_token, kube_cluster, kube_namespace, prometheus_factory, tmp_path)
    finally:
        exporter.stop()


async def _scenario(hub, exporter, culler_token, kube_cluster, namespace, prometheus_factory, tmp_path) -> None:
    # HubMLSpawner refuses a GPU profile that no Ready node has room for ("0 of 0"), as it
    # should; after a multi-GB image import on a loaded machine kubelet's heartbeats may
    # have lagged, so wait until the node is schedulable again before anyone spawns
    await wait_for(lambda: ready_for_gpu_pods(kube_cluster), timeout=180,
                   what=f"the real node Ready with its GPUs (now {node_summary(kube_cluster)})")
    try:
        await asyncio.gather(*(asyncio.to_thread(hub.start_server, u, options={"profile": "gpu-real"}, timeout=300)
                               for u in ("alice", "bob")))
    except AssertionError as e:
        raise AssertionError(f"{e}\nthe real node: {node_summary(kube_cluster)}\n{hub.log_tail()}") from None
    pods = {u: user_pods(kube_cluster, namespace, u) for u in ("alice", "bob")}
    for user, [pod] in pods.items():
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == "1", (user, limits)
    pod_names = {u: ps[0]["metadata"]["name"] for u, ps in pods.items()}

    prom = prometheus_factory([exporter.target], scrape_interval="1s")
    for user, pod in pod_names.items():
        prom.wait_for(f'DCGM_FI_DEV_GPU_UTIL{{namespace="{namespace}",pod="{pod}"}} == 0', timeout=60)

    # the culler as the hub service runs it, reading the spawner's own profile list
    catalogue = tmp_path / "profiles.yaml"
    catalogue.write_text(yaml.safe_dump([PROFILE]))
    app = CullerApp()
    app.initialize([
        f"--api-url={hub.api_url}", f"--server-base-url={hub.url.rstrip('/')}",
        f"--CullerApp.api_token={culler_token}", f"--spawner-profiles={catalogue}",
        "--grace-period=0", f"--gpu-idle-window={GPU_WINDOW:g}s", f"--prometheus-url={prom.url}",
        "--prometheus-step=1", f"--namespace={namespace}",
    ])
    culler = app.build()

    alice_token = hub.create_token("alice", scopes=["access:servers!user=alice"])
    bob_token = hub.create_token("bob", scopes=["access:servers!user=bob"])
    alice_kernel, bob_kernel = await asyncio.gather(asyncio.to_thread(start_kernel, hub.url, "alice", alice_token),
                                                    asyncio.to_thread(start_kernel, hub.url, "bob", bob_token))
    log = PassLog()
    stop = asyncio.Event()

    async def passes() -> None:
        while not stop.is_set():
            t = time.time()
            report = await culler.run_pass()
            if report is not None:
                log.add(t, report)
            if log.cull("alice") and log.cull("bob"):
                return
            await asyncio.sleep(max(0.0, PASS_EVERY - (time.time() - t)))

    t0 = time.time()
    culling = asyncio.create_task(passes())
    try:
        await submit_and_leave(alice_kernel, FORGOTTEN_LOOP)
        alice_left = bob_started = time.time()
        out, status = await execute(bob_kernel, PRINTING_CELL, timeout=PRINT_FOR + 60)
        bob_done = time.time()
        assert status == "ok" and f"step {PRINT_FOR - 1}" in out, out[-2000:]
        assert not log.cull("bob"), f"bob was culled while his cell ran: {log.show('bob', t0)}"
        await asyncio.wait_for(asyncio.shield(culling), timeout=IDLE_TIMEOUT + 60)
    except (TimeoutError, asyncio.TimeoutError):
        raise AssertionError(f"not both culled in time.\nalice: {log.show('alice', t0)}\nbob: {log.show('bob', t0)}"
                             f"\n{hub.log_tail()}") from None
    finally:
        stop.set()
        await culling
        culler.hub.close()

    (alice_at, alice_reason), (bob_at, bob_reason) = log.cull("alice"), log.cull("bob")
    alice_after, bob_after = alice_at - alice_left, bob_at - bob_done
    trace = f"alice: {log.show('alice', alice_left)}\nbob (from his cell's end): {log.show('bob', bob_done)}"
    print(f"forgotten loop culled {alice_after:.1f} s after alice left; bob culled {bob_after:.1f} s after his "
          f"cell's last output (idle_timeout {IDLE_TIMEOUT:g} s, GPU-idle window {GPU_WINDOW:g} s, "
          f"passes every {PASS_EVERY:g} s)\n{trace}")
    assert alice_reason == "gpu-idle", trace
    # not before idle_timeout from when the culler first found the loop unattended, which is
    # after she left; at most two passes and a few seconds of the machine's load after it
    assert IDLE_TIMEOUT - 0.5 <= alice_after <= IDLE_TIMEOUT + 2 * PASS_EVERY + 8, trace
    assert bob_reason == "idle", trace
    # every pass before his cull kept him; the last output came at most ~1 s before the cell ended
    assert all(a == Action.KEEP.value for t, a, _ in log.of("bob") if t < bob_at), trace
    # while his cell ran (a pass's kernel read lags its start by a moment at either end)
    assert {r for t, a, r in log.of("bob") if bob_started + 1 < t < bob_done - 3} == {"kernel-busy"}, trace
    assert IDLE_TIMEOUT - 1.5 <= bob_after <= IDLE_TIMEOUT + 2 * PASS_EVERY + 8, trace

    for user in ("alice", "bob"):
        assert "" not in hub.servers(user), (user, hub.servers(user))
    deadline = time.monotonic() + 120
    while any(user_pods(kube_cluster, namespace, u) for u in ("alice", "bob")):
        assert time.monotonic() < deadline, "a culled server's pod outlived it"
        await asyncio.sleep(1)
