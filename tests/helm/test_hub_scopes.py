"""hubml's hub services hold exactly the scopes helm-values/values.yaml grants them.

A real JupyterHub (with configurable-http-proxy and real jupyterhub-singleuser
servers) is started with the services, roles and custom scopes that
zero-to-jupyterhub would build from values.yaml (``hub_services_and_roles``).
Then, with the tokens of those services:

* the culler (``python -m hubml.culler``, run for real) stops an idle server
  and keeps an active one, and with any ONE of its scopes taken away it
  stops nothing: every scope it holds is needed;
* neither service can do what it was not granted (create or delete users,
  start servers, issue tokens, read groups ...): 403;
* a notebook server's own token may call hubml's service and holds the custom
  scopes of its owner only.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from hubml_testing.helm_values import REPO_ROOT, hub_fixture_config, merged_values, role_for_service

pytestmark = [pytest.mark.hub, pytest.mark.slow]

SINGLEUSER = Path(sys.executable).with_name("jupyterhub-singleuser")
CULLER = "hubml-culler"
HUB_EXT = "hubml"


def hub_config(values: dict, tokens: dict[str, str], homes: Path, extra_services: list[dict] = (),
               extra_roles: list[dict] = ()) -> dict:
    """The hub fixture's config for the services/roles values.yaml defines, with real
    jupyterhub-singleuser servers. The culler is run by the test (`--once`)."""
    config = hub_fixture_config(values, tokens, extra_services=extra_services, extra_roles=extra_roles)
    config.update({
        "JupyterHub.spawner_class": "simple",
        # the hub must not turn the culler's own kernel reads (through the
        # proxy) into user activity during the test
        "JupyterHub.last_activity_interval": 3600,
        "Spawner.cmd": [str(SINGLEUSER)],
        # the test machine runs as root; jupyter_server refuses that without the flag
        "Spawner.args": ["--allow-root"],
        "Spawner.start_timeout": 120,
        "Spawner.http_timeout": 120,
        "SimpleLocalProcessSpawner.home_dir_template": str(homes / "{username}"),
    })
    return config


def run_culler(hub, token: str, config: dict, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps({"CullerApp": config}))
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "JUPYTERHUB_API_URL": hub.api_url,
        "JUPYTERHUB_API_TOKEN": token,
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": str(tmp_path),
    }
    return subprocess.run(
        [sys.executable, "-m", "hubml.culler", f"--config={cfg}", "--once"],
        env=env, capture_output=True, text=True, timeout=120,
    )


def test_culler_scopes_are_needed_and_sufficient(jupyterhub_factory, tmp_path):
    values = merged_values()
    scopes = role_for_service(values, CULLER)
    tokens = {CULLER: secrets.token_hex(16), HUB_EXT: secrets.token_hex(16)}
    # one extra service per scope, holding all the culler's scopes but that one
    reduced = {f"culler-without-{i}": [s for s in scopes if s != scope] for i, scope in enumerate(scopes)}
    reduced_tokens = {name: secrets.token_hex(16) for name in reduced}
    homes = tmp_path / "homes"
    homes.mkdir()
    hub = jupyterhub_factory(
        config=hub_config(
            values, tokens, homes,
            extra_services=[{"name": n, "api_token": t} for n, t in reduced_tokens.items()],
            extra_roles=[{"name": n, "scopes": s, "services": [n]} for n, s in reduced.items()],
        ),
        users=["alice", "bob"],
    )
    hub.start_server("alice", timeout=120)
    hub.start_server("bob", timeout=120)

    timeout = 20
    # the culler's own configuration from values.yaml, with test-sized times and
    # this hub's addresses (no Prometheus: GPU-less servers)
    config = dict(values["hub"]["extraFiles"]["hubml-culler-config"]["data"]["CullerApp"])
    profiles = tmp_path / "gpu_profiles.json"
    profiles.write_text(json.dumps(values["hub"]["config"]["HubMLSpawner"]["gpu_profiles"]))
    config.update(timeout=timeout, grace_period=0, prometheus_url="", service_url="",
                  server_base_url=hub.url.rstrip("/"), namespace="default", spawner_profiles=str(profiles))

    # wait until alice's server has been idle longer than the timeout
    deadline = time.monotonic() + 300
    while True:
        last = hub.api("GET", "/users/alice")[1]["servers"][""]["last_activity"]
        idle = datetime.now(timezone.utc) - datetime.fromisoformat(last.replace("Z", "+00:00"))
        if idle > timedelta(seconds=timeout + 2):
            break
        assert time.monotonic() < deadline, "alice's server kept reporting activity"
        time.sleep(1)

    for name, token in reduced_tokens.items():
        hub.set_activity("bob", datetime.now(timezone.utc))
        proc = run_culler(hub, token, config, tmp_path, name)
        missing = sorted(set(scopes) - set(reduced[name]))
        assert "" in hub.servers("alice"), (
            f"the culler stopped alice's server without {missing}: that scope is not needed, "
            f"drop it from values.yaml.\n{proc.stdout}\n{proc.stderr}"
        )
        assert "" in hub.servers("bob")

    hub.set_activity("bob", datetime.now(timezone.utc))
    proc = run_culler(hub, tokens[CULLER], config, tmp_path, "culler")
    assert proc.returncode == 0, f"culler failed with the values' scopes:\n{proc.stdout}\n{proc.stderr}"
    deadline = time.monotonic() + 60
    while "" in hub.servers("alice"):
        assert time.monotonic() < deadline, f"alice's idle server was not stopped:\n{proc.stdout}\n{proc.stderr}"
        time.sleep(0.2)
    assert "" in hub.servers("bob"), f"bob's active server was stopped:\n{proc.stdout}"


# What each service must NOT be able to do, whatever its role.
FORBIDDEN_CALLS = [
    ("POST", "/users", {"usernames": ["mallory"]}),
    ("DELETE", "/users/bob", None),
    ("PATCH", "/users/bob", {"admin": True}),
    ("POST", "/users/bob/tokens", {"note": "stolen"}),
    ("POST", "/users/bob/server", {}),
    ("GET", "/groups", None),
    ("POST", "/groups/team/users", {"users": ["alice"]}),
    ("GET", "/proxy", None),
    ("GET", "/services", None),
    ("POST", "/shutdown", None),
]


def test_services_cannot_do_more_than_granted(jupyterhub_factory, tmp_path):
    values = merged_values()
    tokens = {CULLER: secrets.token_hex(16), HUB_EXT: secrets.token_hex(16)}
    homes = tmp_path / "homes"
    homes.mkdir()
    hub = jupyterhub_factory(config=hub_config(values, tokens, homes),
                             users=["alice", "bob"], groups={"team": ["bob"]})

    for service in (CULLER, HUB_EXT):
        status, me = hub.api("GET", "/user", token=tokens[service])
        assert status == 200 and me["kind"] == "service" and me["name"] == service
        for method, path, body in FORBIDDEN_CALLS:
            status, answer = hub.api(method, path, body, token=tokens[service])
            assert status in (403, 404), f"{service} may {method} {path} ({status}: {answer})"
        assert hub.api("GET", "/users/bob", token=tokens[service])[0] == 200  # it can see users it must judge

    # the culler lists users with their servers and activity
    status, users = hub.api("GET", "/users", token=tokens[CULLER])
    assert status == 200 and {u["name"] for u in users} >= {"alice", "bob"}
    assert all("servers" in u for u in users)
    assert all("last_activity" in s for u in users for s in u["servers"].values())
    # ... but not their groups
    assert all("groups" not in u for u in users)
    # hub_ext reads a user's groups (profile restrictions), not the user list
    status, bob = hub.api("GET", "/users/bob", token=tokens[HUB_EXT])
    assert status == 200 and bob["groups"] == ["team"]
    assert "servers" not in bob and "last_activity" not in bob
    assert hub.api("GET", "/users", token=tokens[HUB_EXT])[0] == 403 or hub.api(
        "GET", "/users", token=tokens[HUB_EXT])[1] == []
    # nobody but the culler may stop servers
    hub.start_server("alice", timeout=120)
    assert hub.api("DELETE", "/users/alice/server", token=tokens[HUB_EXT])[0] == 403


def test_notebook_tokens_carry_hubml_scopes_of_their_owner_only(jupyterhub_factory, tmp_path):
    values = merged_values()
    tokens = {CULLER: secrets.token_hex(16), HUB_EXT: secrets.token_hex(16)}
    homes = tmp_path / "homes"
    homes.mkdir()
    hub = jupyterhub_factory(config=hub_config(values, tokens, homes), users=["alice", "bob"])
    hub.start_server("alice", timeout=120)
    # the server's own token ($JUPYTERHUB_API_TOKEN), as the hub lists it
    status, model = hub.api("GET", "/users/alice/tokens")
    assert status == 200
    server_tokens = [t for t in model["api_tokens"] if t.get("note", "").startswith("Server at")]
    assert server_tokens, f"no server token found: {model}"
    scopes = set(server_tokens[0]["scopes"])
    # JupyterHub's default server scopes (activity, access to itself, as
    # expanded by the hub) plus hubml's custom scopes, for alice only
    assert scopes == {
        "access:servers!server=alice/",
        "users:activity!user=alice",
        "read:users:activity!user=alice",
        "read:users:name!user=alice",
        "read:users:groups!user=alice",
        "custom:hubml:jobs!user=alice",
        "custom:hubml:models!user=alice",
        "custom:hubml:deployments!user=alice",
    }
    # and with it hubml's service identifies alice (HubAuth's /user check) with her scopes
    token = hub.create_token("alice", scopes=sorted(scopes - {"access:servers!server=alice/"}))
    status, me = hub.api("GET", "/user", token=token)
    assert status == 200 and me["name"] == "alice"
    assert "custom:hubml:jobs!user=alice" in me["scopes"]
    # bob cannot be given alice's hubml scopes
    status, answer = hub.api("POST", "/users/bob/tokens", {"scopes": ["custom:hubml:jobs!user=alice"]})
    assert status in (400, 403), answer
