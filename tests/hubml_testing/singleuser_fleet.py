"""A lightweight stand-in for many jupyter_server single-user servers at once.

Real single-user servers take seconds and ~100 MB each; the culler tests and
benchmarks need dozens to 10,000. One ``fleet`` process serves every user's
``/user/<name>/[<server>/]api/kernels`` and ``api/status`` the way
jupyter_server does (same JSON fields, ISO timestamps, token checked against the
real hub with ``access:servers`` scopes through ``jupyterhub.services.auth.HubAuth``),
plus the DCGM exporter's ``/metrics`` format for fake GPUs (the one thing the
project may fake). The test drives it through ``/_fleet/...``:

* ``PUT /_fleet/servers/<user>/<server>`` (server ``_`` = default) with
  ``{"kernels": [{"id", "execution_state", "last_activity", "connections"}],
  "status": 200, "delay": 0, "last_activity": null}`` — what the server answers
  (``last_activity``: the server's own tracked API activity, in ``api/status``);
* ``PUT /_fleet/gpus/<namespace>/<pod>`` with ``{"util": [percent per GPU]}``,
  ``DELETE`` to drop the pod's series;
* ``GET /_fleet/stops?since=N``: when the hub stopped each server (with
  ``InstantSpawner.record_stops``), for benchmarks that time culls exactly.

:class:`InstantSpawner` (hub side) "starts" a server by pointing the hub at the
fleet, so a spawn takes milliseconds; ``user_options["stop_delay"]`` makes its
``stop`` slow (to get the hub's 202 answer).

Run: ``python -m hubml_testing.singleuser_fleet --port P --hub-api URL``
(token in ``$FLEET_HUB_TOKEN``); :func:`start_fleet` does this for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

from hubml_testing.dcgm import exposition
from hubml_testing.ports import free_port, wait_http

# --------------------------------------------------------------------------- hub side


def _spawner_class():
    from jupyterhub.spawner import Spawner
    from tornado.httpclient import AsyncHTTPClient
    from traitlets import Bool, Unicode

    class InstantSpawner(Spawner):
        """Spawner whose servers are routes to the fleet process."""

        fleet_url = Unicode(
            os.environ.get("FLEET_URL", ""), help="Base URL of the fleet process."
        ).tag(config=True)
        record_stops = Bool(
            False, help="Tell the fleet when each stop happens (GET /_fleet/stops lists them): "
            "benchmarks time culls by the hub's own stop, not by polling."
        ).tag(config=True)

        _running = False

        async def start(self):
            u = urlparse(self.fleet_url)
            self._running = True
            return (u.hostname, u.port)

        async def poll(self):
            return None if self._running else 0

        async def stop(self, now=False):
            delay = float((self.user_options or {}).get("stop_delay", 0) or 0)
            if delay and not now:
                await asyncio.sleep(delay)
            self._running = False
            if self.record_stops:
                body = json.dumps({"user": self.user.name, "server": self.name, "time": time.time()})
                await AsyncHTTPClient().fetch(f"{self.fleet_url}/_fleet/stops", method="POST", body=body,
                                              raise_error=False)

        def get_state(self):
            state = super().get_state()
            if self._running:
                state["running"] = True
            return state

        def load_state(self, state):
            super().load_state(state)
            self._running = bool(state.get("running"))

        def options_from_form(self, formdata):
            return {k: v[0] for k, v in formdata.items()}

    return InstantSpawner


def __getattr__(name):  # lazily build the class so importing this module is cheap
    if name == "InstantSpawner":
        cls = _spawner_class()
        globals()["InstantSpawner"] = cls
        return cls
    raise AttributeError(name)


# --------------------------------------------------------------------------- fleet process


def _make_app(hub_api: str, hub_token: str):
    from jupyterhub.services.auth import HubAuth
    from tornado import web

    auth = HubAuth(api_url=hub_api, api_token=hub_token, cache_max_age=300)
    servers: dict[str, dict] = {}
    gpus: dict[tuple[str, str], list[float]] = {}
    stops: list[dict] = []

    class Stops(web.RequestHandler):
        def post(self):
            stops.append(json.loads(self.request.body))
            self.set_status(204)

        def get(self):  # ?since=N: the stops from index N on
            self.write({"stops": stops[int(self.get_argument("since", "0")):]})

    class Control(web.RequestHandler):
        def put(self, user, server):
            servers[f"{user}/{'' if server == '_' else server}"] = json.loads(self.request.body)
            self.set_status(204)

        def delete(self, user, server):
            servers.pop(f"{user}/{'' if server == '_' else server}", None)
            self.set_status(204)

    class Gpus(web.RequestHandler):
        def put(self, ns, pod):
            gpus[(ns, pod)] = [float(v) for v in json.loads(self.request.body)["util"]]
            self.set_status(204)

        def delete(self, ns, pod):
            gpus.pop((ns, pod), None)
            self.set_status(204)

    class Metrics(web.RequestHandler):
        def get(self):
            self.set_header("Content-Type", "text/plain; version=0.0.4")
            self.write(exposition(gpus))

    class SingleUser(web.RequestHandler):
        async def get(self, user, rest):
            # /user/<user>/[<server>/]api/...
            parts = rest.split("/")
            if parts and parts[0] == "api":
                server, api = "", parts[1:]
            elif len(parts) > 1 and parts[1] == "api":
                server, api = parts[0], parts[2:]
            else:
                self.write("<html>fleet single-user page</html>")
                return
            token = (self.request.headers.get("Authorization") or "").removeprefix("token ").strip()
            model = await auth.user_for_token(token, sync=False) if token else None
            need = {"access:servers", f"access:servers!user={user}", f"access:servers!server={user}/{server}"}
            if model is None or not auth.check_scopes(need, model):
                raise web.HTTPError(403)
            cfg = servers.get(f"{user}/{server}", {"kernels": []})
            if cfg.get("delay"):
                await asyncio.sleep(float(cfg["delay"]))
            if cfg.get("status", 200) != 200:
                raise web.HTTPError(int(cfg["status"]))
            if api[:1] == ["kernels"]:
                out = [
                    {"id": k["id"], "name": "python3", "execution_state": k.get("execution_state", "idle"),
                     "last_activity": k.get("last_activity"), "connections": k.get("connections", 0)}
                    for k in cfg["kernels"]
                ]
                self.set_header("Content-Type", "application/json")
                self.write(json.dumps(out))
            elif api[:1] == ["status"]:
                # jupyter_server's own last_activity: its kernels and its tracked
                # API requests ("last_activity" here), never untracked reads
                times = [k.get("last_activity") for k in cfg["kernels"] if k.get("last_activity")]
                times += [cfg["last_activity"]] if cfg.get("last_activity") else []
                self.write({"started": None, "last_activity": max(times) if times else None,
                            "connections": sum(k.get("connections", 0) for k in cfg["kernels"]),
                            "kernels": len(cfg["kernels"])})
            else:
                raise web.HTTPError(404)

    return web.Application([
        (r"/_fleet/stops", Stops),
        (r"/_fleet/servers/([^/]+)/([^/]+)", Control),
        (r"/_fleet/gpus/([^/]+)/([^/]+)", Gpus),
        (r"/metrics", Metrics),
        (r"/user/([^/]+)/(.*)", SingleUser),
        (r"/_fleet/ready", type("Ready", (web.RequestHandler,), {"get": lambda self: self.write("ok")})),
    ])


def _serve(port: int, hub_api: str, token: str) -> None:
    from tornado.ioloop import IOLoop

    app = _make_app(hub_api, token)
    app.listen(port, "127.0.0.1")
    IOLoop.current().start()


# --------------------------------------------------------------------------- test helper


@dataclass
class Fleet:
    url: str
    proc: subprocess.Popen

    def _put(self, path: str, body) -> None:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="PUT",
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=10).close()

    def set_server(self, user: str, server: str = "", *, kernels=(), status: int = 200, delay: float = 0,
                   last_activity: str | None = None) -> None:
        """What the server answers; ``last_activity`` (ISO) is the server's own
        API activity, which ``api/status`` reports with its kernels'."""
        self._put(
            f"/_fleet/servers/{quote(user, safe='')}/{quote(server or '_', safe='')}",
            {"kernels": list(kernels), "status": status, "delay": delay, "last_activity": last_activity},
        )

    def set_gpu(self, namespace: str, pod: str, util: list[float]) -> None:
        self._put(f"/_fleet/gpus/{namespace}/{pod}", {"util": util})

    @property
    def metrics_target(self) -> str:
        return self.url.removeprefix("http://")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_fleet(hub_api: str, token: str, log_dir: Path, port: int | None = None) -> Fleet:
    """Start the fleet process on ``port`` (pick it first when the hub config needs it)."""
    port = port or free_port()
    env = dict(os.environ, FLEET_HUB_TOKEN=token)
    tests_dir = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [tests_dir, env.get("PYTHONPATH", "")] if p)
    log = open(log_dir / f"fleet-{port}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hubml_testing.singleuser_fleet", "--port", str(port), "--hub-api", hub_api],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    log.close()
    fleet = Fleet(f"http://127.0.0.1:{port}", proc)
    if not wait_http(fleet.url + "/_fleet/ready", timeout=30, alive=lambda: proc.poll() is None):
        fleet.stop()
        raise RuntimeError(f"fleet did not start; see {log_dir}/fleet-{port}.log")
    return fleet


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--hub-api", required=True)
    a = ap.parse_args()
    _serve(a.port, a.hub_api, os.environ["FLEET_HUB_TOKEN"])
