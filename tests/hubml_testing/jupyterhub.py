"""pytest plugin: start a REAL JupyterHub (with configurable-http-proxy) per test.

Usage (the plugin is registered as ``hubml_testing.jupyterhub``)::

    def test_something(jupyterhub_factory):
        hub = jupyterhub_factory(
            config={
                "JupyterHub.spawner_class": "mypkg.spawners.InstantSpawner",
                "JupyterHub.services": [{"name": "culler", "api_token": "secret"}],
                "JupyterHub.load_roles": [
                    {"name": "culler", "scopes": ["list:users"], "services": ["culler"]},
                ],
            },
            extra_config="c.Spawner.http_timeout = 5\\n",
            users=["alice", "bob"],
            groups={"team": ["alice"]},
        )
        hub.create_token("alice", scopes=["self"])
        hub.start_server("alice")
        status, body = hub.api("GET", "/users/alice")

What the factory does:

* picks free loopback ports for the public proxy, the proxy API and the hub,
  writes ``jupyterhub_config.py`` into a fresh temp dir (sqlite DB, cookie
  secret and pid files live there too) and runs ``python -m jupyterhub``;
* configurable-http-proxy is the one from the repo's ``node_modules`` (``npm ci``
  at the repo root installs it); when it is missing the test FAILS with a reason
  instead of skipping, because the suite must run the real proxy;
* the hub always gets one service, ``hubml-test-admin``, holding the built-in
  ``admin`` role; its token is ``hub.admin_token`` and the helpers use it;
* ``services`` and ``load_roles`` given in ``config`` are appended to the
  fixture's own, every other key is assigned as ``c.<Class>.<trait> = value``
  (values must be Python literals; give classes as import strings);
* waits until ``/hub/api`` answers; on teardown stops the hub (which stops the
  proxy and, with ``cleanup_servers``, the servers) and kills whatever is left
  of the processes it started.

Everything here is synchronous (``urllib``) so both sync and async tests can
use it; the async tests' event loop is simply blocked during start-up.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from hubml_testing.ports import free_port, wait_http

REPO_ROOT = Path(__file__).resolve().parents[2]
CHP_PATH = REPO_ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
ADMIN_SERVICE = "hubml-test-admin"


def _isoformat(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class RunningHub:
    """A started JupyterHub and helpers that talk to its REST API."""

    url: str  # public URL through the proxy, e.g. http://127.0.0.1:PORT/
    api_url: str  # .../hub/api
    hub_url: str  # the hub's own (non-proxied) URL, .../hub/
    admin_token: str
    workdir: Path
    proc: subprocess.Popen
    proxy_pid_file: Path
    log_path: Path
    _closed: bool = field(default=False, repr=False)

    # ---- raw API -------------------------------------------------------
    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        timeout: float = 30,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Call the hub REST API; returns ``(status, parsed JSON or None)``.

        Never raises for HTTP error codes, so tests can assert on them.
        """
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Authorization": f"token {token or self.admin_token}"}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        req = urllib.request.Request(
            self.api_url + path, data=data, method=method, headers=hdrs
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw = e.read()
            status = e.code
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf8", "replace")
        return status, parsed

    def _ok(self, method: str, path: str, body: Any = None, **kw) -> Any:
        status, parsed = self.api(method, path, body, **kw)
        if status >= 400:
            raise AssertionError(f"{method} {path} -> {status}: {parsed}")
        return parsed

    # ---- helpers ----------------------------------------------------------
    def create_users(self, *names: str, admin: bool = False) -> None:
        """Create users (existing ones are left alone)."""
        missing = [n for n in names if self.api("GET", f"/users/{quote(n)}")[0] == 404]
        if missing:
            self._ok("POST", "/users", {"usernames": missing, "admin": admin})

    def create_group(self, name: str, users: list[str]) -> None:
        self._ok("POST", f"/groups/{quote(name)}", {"users": users})

    def create_token(
        self, user: str, *, scopes: list[str] | None = None, note: str = "test"
    ) -> str:
        """Issue an API token for ``user`` (scopes default to the user's own)."""
        body: dict[str, Any] = {"note": note}
        if scopes is not None:
            body["scopes"] = scopes
        return self._ok("POST", f"/users/{quote(user)}/tokens", body)["token"]

    def start_server(
        self,
        user: str,
        name: str = "",
        options: dict | None = None,
        *,
        timeout: float = 60,
    ) -> dict:
        """Start a (named) server, wait until the hub reports it ready.

        Returns the server model from the user model.
        """
        self.create_users(user)
        path = f"/users/{quote(user)}/servers/{quote(name)}" if name else f"/users/{quote(user)}/server"
        status, body = self.api("POST", path, options or {})
        if status not in (201, 202):
            raise AssertionError(f"starting {user}/{name} -> {status}: {body}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self._ok("GET", f"/users/{quote(user)}")
            server = model["servers"].get(name)
            if server and server.get("ready"):
                return server
            time.sleep(0.05)
        raise AssertionError(f"server {user}/{name} not ready after {timeout}s")

    def stop_server(self, user: str, name: str = "", *, timeout: float = 60) -> None:
        path = f"/users/{quote(user)}/servers/{quote(name)}" if name else f"/users/{quote(user)}/server"
        status, body = self.api("DELETE", path)
        if status not in (202, 204, 400):  # 400: already stopped
            raise AssertionError(f"stopping {user}/{name} -> {status}: {body}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if name not in self.servers(user):
                return
            time.sleep(0.05)
        raise AssertionError(f"server {user}/{name} still running after {timeout}s")

    def servers(self, user: str) -> dict[str, dict]:
        """The user's active (ready or pending) servers keyed by name."""
        return self._ok("GET", f"/users/{quote(user)}")["servers"]

    def set_activity(
        self,
        user: str,
        when: datetime,
        server: str | None = "",
        *,
        user_activity: bool = True,
    ) -> None:
        """Seed ``last_activity`` through the hub's activity API.

        The hub only moves activity forward, like it does for real servers.
        """
        body: dict[str, Any] = {}
        if user_activity:
            body["last_activity"] = _isoformat(when)
        if server is not None:
            body["servers"] = {server: {"last_activity": _isoformat(when)}}
        self._ok("POST", f"/users/{quote(user)}/activity", body)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no hub log)"

    # ---- lifecycle ----------------------------------------------------------
    def stop(self) -> None:
        """Stop the hub and everything it started. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # the hub stops the proxy it started; make sure, by pid, that it did
        try:
            pid = int(self.proxy_pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid:
            _kill_pid(pid)


def json_call(url: str, token: str, method: str = "GET", body: Any = None,
              timeout: float = 60) -> tuple[int, Any]:
    """One request with a hub token; returns (status, decoded JSON or text), errors included."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf8", "replace")


class Browser:
    """A cookie-keeping client that follows redirects, as a user's browser does."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> tuple[int, str, str]:
        with self.opener.open(self.base + path, timeout=60) as r:
            return r.status, r.geturl(), r.read().decode()

    def post_form(self, path: str, fields: dict[str, str]) -> tuple[int, str, str]:
        data = urllib.parse.urlencode(fields).encode()
        with self.opener.open(self.base + path, data=data, timeout=120) as r:
            return r.status, r.geturl(), r.read().decode()

    def login(self, user: str) -> None:
        _, _, html = self.get("hub/login")
        self.post_form("hub/login", {"username": user, "password": "any", "_xsrf": xsrf(html)})


def xsrf(html: str) -> str:
    """The page's XSRF token: a hidden ``_xsrf`` field, or the ``_xsrf`` query of a form's action."""
    found = re.search(r'name="_xsrf" value="([^"]+)"', html) or re.search(r'[?&;]_xsrf=([^"&]+)', html)
    if not found:
        raise AssertionError(f"no _xsrf field or query in the page:\n{html[-3000:]}")
    return urllib.parse.unquote(found.group(1).replace("&amp;", ""))


def spawn_page(hub_url: str, user: str) -> str:
    """The HTML of /hub/spawn as ``user`` sees it, after a real login (dummy authenticator)."""
    browser = Browser(hub_url)
    browser.login(user)
    return browser.get("hub/spawn")[2]


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _config_text(
    *,
    workdir: Path,
    public_port: int,
    proxy_api_port: int,
    hub_ip: str,
    hub_port: int,
    admin_token: str,
    proxy_token: str,
    config: dict[str, Any],
    extra_config: str,
) -> str:
    services = [{"name": ADMIN_SERVICE, "api_token": admin_token}]
    roles = [{"name": "admin", "services": [ADMIN_SERVICE]}]
    lines = [
        "# written by hubml_testing.jupyterhub",
        "c = get_config()  # noqa",
        f"c.JupyterHub.bind_url = 'http://127.0.0.1:{public_port}'",
        f"c.JupyterHub.hub_ip = {hub_ip!r}",
        f"c.JupyterHub.hub_port = {hub_port}",
        f"c.JupyterHub.db_url = {('sqlite:///' + str(workdir / 'jupyterhub.sqlite'))!r}",
        f"c.JupyterHub.cookie_secret_file = {str(workdir / 'cookie_secret')!r}",
        f"c.JupyterHub.pid_file = {str(workdir / 'jupyterhub.pid')!r}",
        "c.JupyterHub.authenticator_class = 'dummy'",
        "c.Authenticator.allow_all = True",
        "c.JupyterHub.cleanup_servers = True",
        "c.JupyterHub.cleanup_proxy = True",
        f"c.ConfigurableHTTPProxy.command = [{str(CHP_PATH)!r}]",
        f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{proxy_api_port}'",
        f"c.ConfigurableHTTPProxy.auth_token = {proxy_token!r}",
        f"c.ConfigurableHTTPProxy.pid_file = {str(workdir / 'proxy.pid')!r}",
        "c.ConfigurableHTTPProxy.should_start = True",
    ]
    for key, value in config.items():
        if key == "JupyterHub.services":
            services.extend(value)
            continue
        if key == "JupyterHub.load_roles":
            roles.extend(value)
            continue
        if key == "JupyterHub.hub_ip":
            continue  # written above
        if key.count(".") != 1:
            raise ValueError(f"config key {key!r} must look like 'Class.trait'")
        lines.append(f"c.{key} = {value!r}")
    lines.append(f"c.JupyterHub.services = {services!r}")
    lines.append(f"c.JupyterHub.load_roles = {roles!r}")
    lines.append(extra_config)
    return "\n".join(lines) + "\n"


def start_hub(
    tmp_root: Path,
    *,
    config: dict[str, Any] | None = None,
    extra_config: str = "",
    users: list[str] | None = None,
    groups: dict[str, list[str]] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 90,
    public_port: int | None = None,
    admin_token: str | None = None,
) -> RunningHub:
    """Start a hub in a fresh directory under ``tmp_root`` (see module doc).

    ``public_port`` fixes the proxy's port (use :func:`hubml_testing.ports.free_port`)
    when the config itself must know the public URL, e.g. a service's command line;
    ``admin_token`` fixes the admin service's token for processes started before
    the hub (e.g. single-user stand-ins a restored hub checks at start-up).
    """
    if not CHP_PATH.exists():
        pytest.fail(
            f"configurable-http-proxy is not installed at {CHP_PATH}: the JupyterHub "
            "fixture runs the real proxy. Run `npm ci` in the repository root "
            "(package.json pins configurable-http-proxy) and re-run the tests.",
            pytrace=False,
        )
    workdir = Path(tempfile.mkdtemp(prefix="hub-", dir=tmp_root))
    public_port = public_port or free_port()
    hub_ip = (config or {}).get("JupyterHub.hub_ip", "127.0.0.1")  # the real-node tests: the node's address
    proxy_api_port, hub_port = free_port(), free_port(hub_ip)
    admin_token = admin_token or secrets.token_hex(16)
    text = _config_text(
        workdir=workdir,
        public_port=public_port,
        proxy_api_port=proxy_api_port,
        hub_ip=hub_ip,
        hub_port=hub_port,
        admin_token=admin_token,
        proxy_token=secrets.token_hex(16),
        config=config or {},
        extra_config=extra_config,
    )
    (workdir / "jupyterhub_config.py").write_text(text)
    log_path = workdir / "jupyterhub.log"
    proc_env = dict(os.environ)
    tests_dir = str(REPO_ROOT / "tests")
    proc_env["PYTHONPATH"] = os.pathsep.join(
        p for p in [tests_dir, str(REPO_ROOT), proc_env.get("PYTHONPATH", "")] if p
    )
    proc_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(workdir / "jupyterhub_config.py")],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=proc_env,
        )
    base = f"http://127.0.0.1:{public_port}/"
    hub = RunningHub(
        url=base,
        api_url=base + "hub/api",
        hub_url=f"http://{hub_ip}:{hub_port}/hub/",
        admin_token=admin_token,
        workdir=workdir,
        proc=proc,
        proxy_pid_file=workdir / "proxy.pid",
        log_path=log_path,
    )
    up = wait_http(
        hub.api_url + "/",
        timeout=timeout,
        alive=lambda: proc.poll() is None,
        accept=lambda code: code == 200,
    )
    if not up:
        tail = hub.log_tail()
        hub.stop()
        pytest.fail(
            f"JupyterHub did not answer at {hub.api_url}/ within {timeout}s "
            f"(exit code {proc.poll()}). Last log lines:\n{tail}",
            pytrace=False,
        )
    if users:
        hub.create_users(*users)
    for gname, members in (groups or {}).items():
        hub.create_users(*members)
        hub.create_group(gname, members)
    return hub


@pytest.fixture
def jupyterhub_factory(tmp_path_factory):
    """Factory fixture: ``jupyterhub_factory(config=..., extra_config=..., users=..., groups=...)``.

    Every hub started through it is stopped at teardown.
    """
    hubs: list[RunningHub] = []
    root = tmp_path_factory.mktemp("jupyterhub")

    def factory(**kwargs) -> RunningHub:
        hub = start_hub(root, **kwargs)
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        hub.stop()
