"""What a kernel read shows dates from when its answer came, not from the pass's start.

Found on the real node (tests/node/test_culler_e2e.py): with the hub's user list slow
under load, the pass that first saw a forgotten loop had begun before the cell did, and
the loop was culled that much before its idle_timeout. Here the single-user stand-in
answers kernel reads 3 s late, so a pass starting at 0 s first sees the loop at 3 s:
with idle_timeout 3 s the cull may not come from a pass that starts before 6 s.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from culler_env import NAMESPACE, kernel, make_culler, now, start_env
from hubml.culler.policy import Action

pytestmark = [pytest.mark.hub, pytest.mark.prometheus, pytest.mark.slow]

READ_DELAY = 3.0  # s the server takes to answer each read
IDLE_TIMEOUT = 3.0  # s, profile "a100" of culler_env.PROFILES (GPU-idle window 3 s too)


async def test_a_forgotten_loop_is_dated_from_the_read_that_saw_it(jupyterhub_factory, prometheus_factory, tmp_path):
    env = start_env(jupyterhub_factory, tmp_path)
    hub, fleet = env.hub, env.fleet
    prom = prometheus_factory([fleet.metrics_target], scrape_interval="1s")
    hub.start_server("lee", "", {"profile": "a100"})
    fleet.set_gpu(NAMESPACE, "jupyter-lee", [0])
    prom.wait_for('DCGM_FI_DEV_GPU_UTIL{pod="jupyter-lee"}', timeout=30)
    await asyncio.sleep(4)  # Prometheus covers the GPU-idle window
    # a loop left running since long ago, nobody connected, GPU idle: forgotten, once seen
    fleet.set_server("lee", "", kernels=[kernel("k", "busy", now())], delay=READ_DELAY)
    _, culler = make_culler(env, f"--prometheus-url={prom.url}")
    passes: list[tuple[float, str, str]] = []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 30:
            started = time.monotonic() - t0
            report = await culler.run_pass()
            d = report.decision_for("lee")
            passes.append((started, d.action.value, d.reason))
            if d.action == Action.CULL:
                break
            await asyncio.sleep(0.5)
    finally:
        culler.hub.close()
    started, action, reason = passes[-1]
    assert (action, reason) == ("cull", "gpu-idle"), passes
    # the first read answered at READ_DELAY at the earliest: the cull's pass starts at
    # least idle_timeout after that (it would start at ~3.5 s if dated from the pass)
    assert started >= READ_DELAY + IDLE_TIMEOUT, passes
    assert all(a == "keep" for _, a, _ in passes[:-1]), passes
    assert "" not in hub.servers("lee")
