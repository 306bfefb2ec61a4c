"""One cull pass over N ready servers (default 10,000): hubml vs jupyterhub-idle-culler.

Real JupyterHub 6.1.1 + configurable-http-proxy, servers from the fleet stand-in
(InstantSpawner), 10% of them on the GPU profile "a100" whose kernels hubml
reads through the proxy and whose DCGM series it reads from a real Prometheus.
All servers are recently active, so neither culler stops anything: the pass is
pure overhead (listing, reads, decisions). Both run in this process, at their
defaults (idle-culler: concurrency 10, hub default page size; hubml: concurrency
10, page size 200), alternating, ``--rounds`` times each; medians are printed.

    .venv/bin/python bench/culler_pass10k.py [--servers 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import culler_setup  # noqa: E402
from hubml_testing.prometheus import start_prometheus  # noqa: E402


def ready_count(hub) -> int:
    status, body = hub.api(
        "GET", "/users?state=ready&limit=1",
        headers={"Accept": "application/jupyterhub-pagination+json"},
    )
    return body["_pagination"]["total"]


def seed_db(db_path: Path, fleet_port: int, n: int) -> None:
    """Write N users with running servers straight into a fresh hub database.

    Spawning 10,000 servers through the REST API takes about an hour on the
    benchmark machine; the hub restores running servers from its database at
    start-up exactly as after a hub restart (poll, then proxy routes), so the
    culled-upon state is the same.
    """
    from datetime import datetime, timezone

    from jupyterhub import orm

    session = orm.new_session_factory(f"sqlite:///{db_path}")()
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for i in range(n):
        name = f"u{i:05d}"
        user = orm.User(name=name, created=now, last_activity=now)
        server = orm.Server(proto="http", ip="127.0.0.1", port=fleet_port, base_url=f"/user/{name}/")
        spawner = orm.Spawner(
            name="", user=user, server=server, started=now, last_activity=now,
            state={"running": True},
            user_options={"profile": "a100"} if i % 10 == 0 else {},
        )
        session.add_all([user, server, spawner])
        if i % 1000 == 999:
            session.commit()
    session.commit()
    session.close()


async def hubml_pass(env, prom_url: str) -> tuple[float, int, int]:
    from hubml.culler.app import CullerApp

    app = CullerApp()
    app.initialize([
        f"--api-url={env.hub.api_url}", f"--server-base-url={env.hub.url.rstrip('/')}",
        f"--CullerApp.api_token={env.token}", f"--prometheus-url={prom_url}",
        "--namespace=bench", '--profiles={"a100": {"idle_timeout": "30m", "gpu": 1}}',
        "--log-level=WARN",
    ])
    culler = app.build()
    t0 = time.perf_counter()
    report = await culler.run_pass()
    wall = time.perf_counter() - t0
    culler.hub.close()
    assert not report.partial, report.error
    culled = len([o for o in report.outcomes if o.decision.action.value == "cull"])
    hub_requests = sum(v for k, v in report.requests.items() if k not in ("kernels", "prometheus"))
    total = sum(report.requests.values())
    print(f"  hubml: {wall:.2f}s, {len(report.outcomes)} servers, hub API requests {hub_requests}, "
          f"all requests {total} ({report.requests}), culled {culled}", flush=True)
    return wall, hub_requests, total


async def idle_culler_pass(env) -> tuple[float, int, int]:
    from jupyterhub_idle_culler import cull_idle
    from tornado.httpclient import AsyncHTTPClient

    counter = {"n": 0}
    original = AsyncHTTPClient.fetch

    def counting(self, *args, **kwargs):
        counter["n"] += 1
        return original(self, *args, **kwargs)

    AsyncHTTPClient.fetch = counting
    log = logging.getLogger("idle-culler-bench")
    log.setLevel(logging.WARNING)
    try:
        t0 = time.perf_counter()
        await cull_idle(url=env.hub.api_url, api_token=env.token, inactive_limit=3600, logger=log, concurrency=10)
        wall = time.perf_counter() - t0
    finally:
        AsyncHTTPClient.fetch = original
    print(f"  jupyterhub-idle-culler: {wall:.2f}s, hub API requests {counter['n']}", flush=True)
    return wall, counter["n"], counter["n"]


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import tempfile

    db = Path(tempfile.mkdtemp(prefix="culler-bench-db-")) / "hub.sqlite"
    fleet_port = culler_setup.free_port()
    t0 = time.perf_counter()
    seed_db(db, fleet_port, args.servers)
    env = culler_setup.start(
        {"JupyterHub.api_page_max_limit": 200, "JupyterHub.db_url": f"sqlite:///{db}",
         "JupyterHub.cleanup_servers": False, "JupyterHub.init_spawners_timeout": 600},
        fleet_port=fleet_port,
    )
    prom = None
    try:
        while ready_count(env.hub) < args.servers:
            time.sleep(1)
        print(f"hub up with {args.servers} ready servers after {time.perf_counter() - t0:.0f}s", flush=True)
        for i in range(0, args.servers, 10):
            env.fleet.set_gpu("bench", f"jupyter-u{i:05d}", [35.0])
        prom = start_prometheus(Path(tempfile.mkdtemp(prefix="culler-bench-prom-")), [env.fleet.metrics_target], scrape_interval="5s")
        deadline = time.time() + 60
        while time.time() < deadline and len(prom.query("DCGM_FI_DEV_GPU_UTIL")) < args.servers // 10:
            time.sleep(1)
        ours, theirs = [], []
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            theirs.append(asyncio.run(idle_culler_pass(env)))
            ours.append(asyncio.run(hubml_pass(env, prom.url)))
        assert ready_count(env.hub) == args.servers  # nobody was culled
        o = statistics.median(w for w, _, _ in ours)
        t = statistics.median(w for w, _, _ in theirs)
        result = {
            "servers": args.servers,
            "machine": culler_setup.machine(),
            "hubml_wall_s": round(o, 2),
            "idle_culler_wall_s": round(t, 2),
            "wall_ratio_hubml_over_idle_culler": round(o / t, 3),
            "hubml_hub_requests": ours[0][1],
            "hubml_all_requests": ours[0][2],
            "idle_culler_hub_requests": theirs[0][1],
        }
        print(json.dumps(result, indent=2))
        print(f"RATIO wall time hubml/idle-culler = {o / t:.2f} (<= 1.00 means hubml is no slower)")
    finally:
        if prom:
            prom.stop()
        env.stop()


if __name__ == "__main__":
    main()
