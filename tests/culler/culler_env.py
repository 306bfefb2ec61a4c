"""Test environment for the culler: real hub + fleet + real Prometheus.

Not a fixture plugin of its own: the culler tests import :func:`start_env`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

from hubml.culler.app import CullerApp
from hubml_testing.jupyterhub import RunningHub
from hubml_testing.ports import free_port
from hubml_testing.singleuser_fleet import Fleet, start_fleet

CULLER_SERVICE = "hubml-culler"
#: the scopes the README documents for the culler (least privilege)
CULLER_SCOPES = ["list:users", "read:servers", "delete:servers", "access:servers"]
NAMESPACE = "hubml"


@dataclass
class Env:
    hub: RunningHub
    fleet: Fleet
    culler_token: str


def hub_config(fleet_port: int, culler_token: str, *, service: dict | None = None) -> dict:
    svc = {"name": CULLER_SERVICE, "api_token": culler_token}
    svc.update(service or {})
    return {
        "JupyterHub.spawner_class": "hubml_testing.singleuser_fleet.InstantSpawner",
        "InstantSpawner.fleet_url": f"http://127.0.0.1:{fleet_port}",
        "JupyterHub.allow_named_servers": True,
        "JupyterHub.last_activity_interval": 3600,
        "JupyterHub.tornado_settings": {"slow_stop_timeout": 1},
        "Spawner.http_timeout": 10,
        "Spawner.start_timeout": 10,
        "JupyterHub.services": [svc],
        "JupyterHub.load_roles": [
            {"name": "hubml-culler", "scopes": CULLER_SCOPES, "services": [CULLER_SERVICE]},
            {"name": "user", "scopes": ["self", f"access:services!service={CULLER_SERVICE}"]},
        ],
    }


def start_env(jupyterhub_factory, tmp_path, *, service: dict | None = None, extra: dict | None = None) -> Env:
    fleet_port = free_port()
    token = secrets.token_hex(16)
    config = hub_config(fleet_port, token, service=service)
    config.update(extra or {})
    hub = jupyterhub_factory(config=config)
    fleet = start_fleet(hub.api_url, hub.admin_token, tmp_path, port=fleet_port)
    hub_stop = hub.stop

    def stop_all():
        hub_stop()
        fleet.stop()

    hub.stop = stop_all  # fleet goes down with the hub at teardown
    return Env(hub, fleet, token)


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def kernel(kid: str, state: str, when: datetime, connections: int = 0) -> dict:
    return {"id": kid, "execution_state": state, "last_activity": iso(when), "connections": connections}


PROFILES = json.dumps({
    "a100": {"idle_timeout": "3s", "gpu": 1},
    "long": {"idle_timeout": "1h"},
})


def now() -> datetime:
    """The aware UTC time the culler compares activity with."""
    return datetime.now(timezone.utc)


def make_culler(env, *args: str, api_url: str | None = None):
    """Build the culler the way ``python -m hubml.culler`` does, from argv."""
    app = CullerApp()
    base = [
        f"--api-url={api_url or env.hub.api_url}",
        f"--server-base-url={env.hub.url.rstrip('/')}",
        f"--CullerApp.api_token={env.culler_token}",
        "--timeout=3s",
        "--grace-period=0",
        f"--profiles={PROFILES}",
        f"--namespace={NAMESPACE}",
        "--prometheus-step=1",
        "--gpu-idle-window=3s",
    ]
    names = {a.split("=", 1)[0] for a in args}
    app.initialize([a for a in base if a.split("=", 1)[0] not in names] + list(args))
    return app, app.build()


def decisions(report) -> dict[str, tuple[str, str]]:
    """A pass report as {server label: (action, reason)}, for equality asserts."""
    return {o.label: (o.decision.action.value, o.decision.reason) for o in report.outcomes}

async def wait_for_hit(fault, limit: float = 30.0) -> None:
    """Wait until the culler's request reached the fault proxy (it is then held)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while fault.hits == 0:
        if loop.time() > deadline:
            raise AssertionError(f"the culler never sent {fault.method} {fault.path_regex}")
        await asyncio.sleep(0.02)

def run_cli(env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `python -m hubml.culler` as the hub service would, with the culler's token."""
    return subprocess.run(
        [sys.executable, "-m", "hubml.culler", *args],
        env=dict(os.environ, JUPYTERHUB_API_TOKEN=env.culler_token, JUPYTERHUB_API_URL=env.hub.api_url),
        capture_output=True, text=True, timeout=timeout,
    )

def main_with(env, extra: list[str]) -> int:
    """hubml.culler.app.main on a one-pass base command line, `extra` overriding its options."""
    from hubml.culler.app import main

    base = [
        f"--api-url={env.hub.api_url}", "--server-base-url", env.hub.url.rstrip("/"),
        "--timeout=1s", "--grace-period=0", "--once",
    ]
    # a bad value for an option the base sets replaces it (repeats are refused)
    names = {a.split("=", 1)[0] for a in extra if a.startswith("--")}
    base = [a for a in base if a.split("=", 1)[0] not in names]
    os.environ["JUPYTERHUB_API_TOKEN"] = env.culler_token
    try:
        return main([*base, *extra])
    finally:
        os.environ.pop("JUPYTERHUB_API_TOKEN", None)
