"""Test environment for the culler: real hub + fleet + real Prometheus.

Not a fixture plugin of its own: the culler tests import :func:`start_env`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

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
