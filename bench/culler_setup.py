"""Shared set-up for the culler benchmarks: a real hub + CHP + the fleet.

Reuses the test fixtures' process helpers (tests/hubml_testing) so the
benchmarks run the same real components as the tests.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402  (start_hub reports failures through pytest.fail)

from hubml_testing.jupyterhub import RunningHub, start_hub  # noqa: E402
from hubml_testing.ports import free_port  # noqa: E402
from hubml_testing.singleuser_fleet import Fleet, start_fleet  # noqa: E402

SCOPES = ["list:users", "read:servers", "delete:servers", "access:servers"]


@dataclass
class BenchHub:
    hub: RunningHub
    fleet: Fleet
    token: str
    tmp: Path | None = None

    def stop(self) -> None:
        self.hub.stop()
        self.fleet.stop()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def start(extra: dict | None = None, fleet_port: int | None = None) -> BenchHub:
    # the hub's sqlite database in memory-backed storage where there is one: a
    # commit then costs no fsync, so disk load elsewhere does not time the hub
    shm = Path("/dev/shm")
    tmp = Path(tempfile.mkdtemp(prefix="culler-bench-", dir=shm if shm.is_dir() else None))
    fleet_port = fleet_port or free_port()
    token = secrets.token_hex(16)
    config = {
        "JupyterHub.spawner_class": "hubml_testing.singleuser_fleet.InstantSpawner",
        "InstantSpawner.fleet_url": f"http://127.0.0.1:{fleet_port}",
        "JupyterHub.last_activity_interval": 3600,
        "JupyterHub.concurrent_spawn_limit": 0,
        "JupyterHub.log_level": "WARN",
        "Spawner.http_timeout": 30,
        "JupyterHub.services": [{"name": "culler", "api_token": token}],
        "JupyterHub.load_roles": [{"name": "culler", "scopes": SCOPES, "services": ["culler"]}],
    }
    config.update(extra or {})
    # the fleet starts first: a hub restored from a seeded database checks
    # that every running server answers before it comes up
    public_port, admin_token = free_port(), secrets.token_hex(16)
    fleet = start_fleet(f"http://127.0.0.1:{public_port}/hub/api", admin_token, tmp, port=fleet_port)
    try:
        hub = start_hub(tmp, config=config, timeout=900, public_port=public_port, admin_token=admin_token)
    except pytest.fail.Exception as e:  # pragma: no cover - printed for the operator
        fleet.stop()
        raise SystemExit(str(e)) from None
    return BenchHub(hub, fleet, token, tmp)


def machine() -> str:
    import os

    import psutil

    return f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU"
