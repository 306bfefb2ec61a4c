"""The culler against a real JupyterHub + configurable-http-proxy, the fleet of
single-user stand-ins and a real Prometheus scraping DCGM-format metrics.

Durations are scaled down (timeouts of seconds) because the hub only moves
``last_activity`` forward: idleness is produced by waiting, activity by the
hub's activity API.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime

import pytest
from tornado import web
from tornado.httpserver import HTTPServer

from culler_env import (
    CULLER_SCOPES,
    CULLER_SERVICE,
    NAMESPACE,
    PROFILES,
    decisions,
    iso,
    kernel,
    main_with,
    make_culler,
    now,
    run_cli,
    start_env,
    wait_for_hit,
)
from fault_proxy import FaultProxy
from hubml.culler.policy import Action
from hubml_testing.ports import free_port

pytestmark = [pytest.mark.hub, pytest.mark.slow]

async def test_decisions_server_by_server(jupyterhub_factory, prometheus_factory, tmp_path):
    env = start_env(jupyterhub_factory, tmp_path)
    hub, fleet = env.hub, env.fleet
    prom = prometheus_factory([fleet.metrics_target], scrape_interval="1s")
    t0 = now()
    layout = {
        # label: (user, server, profile, kernels, gpu util or None)
        "alice": ("alice", "", None, [], None),
        "bob": ("bob", "", None, [kernel("k", "idle", t0)], None),
        "carol": ("carol", "", None, [kernel("k", "busy", t0)], None),
        "dave/gpu1": ("dave", "gpu1", "a100", [kernel("k", "busy", t0)], [0]),
        "erin": ("erin", "", "a100", [kernel("k", "busy", t0)], [85]),
        "frank": ("frank", "", "a100", [kernel("k", "busy", t0, connections=1)], [0]),
        "gina": ("gina", "", "long", [], None),
        "hank": ("hank", "", None, None, None),  # kernels endpoint answers 500
        "ivan": ("ivan", "", "a100", [], None),  # GPU profile but no DCGM series
        "judy/exp": ("judy", "exp", None, [kernel("k", "idle", t0)], None),
    }
    pods = {"dave/gpu1": "jupyter-dave--gpu1", "erin": "jupyter-erin", "frank": "jupyter-frank"}
    for label, (user, server, profile, kernels, util) in layout.items():
        hub.start_server(user, server, {"profile": profile} if profile else {})
        if kernels is None:
            fleet.set_server(user, server, status=500)
        else:
            fleet.set_server(user, server, kernels=kernels)
        if util is not None:
            fleet.set_gpu(NAMESPACE, pods[label], util)
    prom.wait_for("DCGM_FI_DEV_GPU_UTIL", min_results=3, timeout=30)
    await asyncio.sleep(4.5)  # everyone's hub activity is now older than 3 s

    app, culler = make_culler(env, f"--prometheus-url={prom.url}")
    # judy's kernel just ran a cell, bob touched his server: both are activity
    fleet.set_server("judy", "exp", kernels=[kernel("k", "idle", now())])
    hub.set_activity("bob", now())
    r1 = await culler.run_pass()
    assert not r1.partial
    assert decisions(r1) == {
        "alice": ("cull", "idle"),
        "bob": ("keep", "active"),
        "carol": ("keep", "kernel-busy"),
        "dave/gpu1": ("keep", "kernel-busy"),  # busy run only starts being observed now
        "erin": ("keep", "kernel-busy"),
        "frank": ("keep", "kernel-busy"),
        "gina": ("keep", "active"),
        "hank": ("skip", "kernels-unavailable"),
        "ivan": ("skip", "gpu-data-unavailable"),
        "judy/exp": ("keep", "active"),
    }
    assert "" not in hub.servers("alice")
    for user, server in [("bob", ""), ("carol", ""), ("dave", "gpu1"), ("hank", ""), ("ivan", ""), ("judy", "exp")]:
        assert hub.servers(user)[server]["ready"], f"{user}/{server} must still run"

    await asyncio.sleep(3.5)  # dave's loop has now been busy, unattended, GPU-idle for the window
    hub.set_activity("bob", now())
    fleet.set_server("judy", "exp", kernels=[kernel("k", "idle", now())])
    r2 = await culler.run_pass()
    d2 = decisions(r2)
    assert d2["dave/gpu1"] == ("cull", "gpu-idle")
    assert d2["erin"] == ("keep", "kernel-busy")  # GPU busy: real work
    assert d2["frank"] == ("keep", "kernel-busy")  # someone attached to the kernel
    assert d2["carol"] == ("keep", "kernel-busy")  # CPU profile: busy kernel is work
    assert d2["bob"] == ("keep", "active")
    assert d2["hank"][0] == "skip" and d2["ivan"][0] == "skip"
    assert "gpu1" not in hub.servers("dave")
    assert hub.servers("erin")[""]["ready"] and hub.servers("frank")[""]["ready"]

    # metrics: culls by reason and profile, GPU-hours, skips
    from prometheus_client import generate_latest

    text = generate_latest(app.metrics.registry).decode()
    assert 'hubml_culler_culls_total{profile="default",reason="idle"} 1.0' in text
    assert 'hubml_culler_culls_total{profile="a100",reason="gpu-idle"} 1.0' in text
    assert 'hubml_culler_skipped_total{reason="kernels-unavailable"} 2.0' in text
    gpu_hours = [line for line in text.splitlines() if line.startswith('hubml_culler_gpu_hours_reclaimed_total{profile="a100"}')]
    assert gpu_hours and float(gpu_hours[0].split()[-1]) > 0
    culler.hub.close()


async def test_gpu_server_is_kept_for_idle_timeout_after_its_last_busy_sample(
        jupyterhub_factory, prometheus_factory, tmp_path):
    """README rule 3 at scaled time (1 s stands for ~7.5 min): a run that ends with the
    user long gone keeps its server for the 8 s idle_timeout after its last busy DCGM
    sample in Prometheus — not for the 3 s GPU-idle window, after which that sample
    has left the window — and a culler restarted in between keeps it as long."""
    env = start_env(jupyterhub_factory, tmp_path)
    hub, fleet = env.hub, env.fleet
    prom = prometheus_factory([fleet.metrics_target], scrape_interval="1s")
    profiles = "--profiles=" + json.dumps({"train": {"idle_timeout": "8s", "gpu": 1}})
    t0 = now()
    hub.start_server("tina", "", {"profile": "train"})
    fleet.set_server("tina", "", kernels=[kernel("k", "idle", t0)])  # the run is a background job
    fleet.set_gpu(NAMESPACE, "jupyter-tina", [90, 0])
    prom.wait_for('DCGM_FI_DEV_GPU_UTIL{pod="jupyter-tina"} > 0', timeout=30)
    await asyncio.sleep(9 - (now() - t0).total_seconds())  # the run goes on; nobody touches the server
    _, culler = make_culler(env, profiles, f"--prometheus-url={prom.url}")
    r = await culler.run_pass()
    assert decisions(r) == {"tina": ("keep", "active")}  # the hub's activity is past 8 s: the GPU keeps it
    assert (now() - r.decision_for("tina").idle_since).total_seconds() < 2.5
    fleet.set_gpu(NAMESPACE, "jupyter-tina", [0, 0])  # the run ends
    ended = now()
    seen: list[tuple[float, str, str, datetime | None]] = []
    restarted = False
    while (now() - ended).total_seconds() < 14:
        if not restarted and (now() - ended).total_seconds() > 5:  # the window has forgotten the run
            culler.hub.close()
            _, culler = make_culler(env, profiles, f"--prometheus-url={prom.url}")  # a restart: no memory
            restarted = True
        r = await culler.run_pass()
        d = r.decision_for("tina")
        seen.append(((now() - ended).total_seconds(), d.action.value, d.reason, d.idle_since))
        if d.action == Action.CULL:
            break
        await asyncio.sleep(0.5)
    culler.hub.close()
    after, action, reason, idle_since = seen[-1]
    assert (action, reason) == ("cull", "idle"), seen
    assert after >= 8 - 1.5, seen  # not before idle_timeout after the last busy sample, which is
    # the one scraped at most 1 s before the end, at most 1 s later at the query's step
    assert abs((idle_since - ended).total_seconds()) <= 1.5, seen
    assert all(a == "keep" for _, a, _, _ in seen[:-1]), seen
    assert any(t > 5 for t, _, _, _ in seen[:-1]), seen  # the restarted culler kept it too
    assert "" not in hub.servers("tina")


async def test_grace_period_warns_and_activity_cancels(jupyterhub_factory, tmp_path):
    env = start_env(jupyterhub_factory, tmp_path)
    hub = env.hub
    events: list[dict] = []

    class Hook(web.RequestHandler):
        def post(self):
            events.append(json.loads(self.request.body))
            self.set_status(204)

    port = free_port()
    server = HTTPServer(web.Application([(r"/hook", Hook)]))
    server.listen(port, "127.0.0.1")
    try:
        for user in ("alice", "bob"):
            hub.start_server(user)
        await asyncio.sleep(3.5)
        app, culler = make_culler(env, "--grace-period=2s", f"--webhook-url=http://127.0.0.1:{port}/hook")
        r1 = await culler.run_pass()
        assert decisions(r1) == {"alice": ("warn", "idle"), "bob": ("warn", "idle")}
        assert [n.server for n in app.board.for_user("alice")] == [""]
        assert app.board.for_user("carol") == []
        assert sorted((e["event"], e["user"]) for e in events) == [("warning", "alice"), ("warning", "bob")]

        hub.set_activity("alice", now())  # alice comes back during the grace period
        r2 = await culler.run_pass()
        assert decisions(r2) == {"alice": ("keep", "activity-during-grace"), "bob": ("grace", "idle")}
        assert app.board.for_user("alice") == [] and len(app.board.for_user("bob")) == 1

        await asyncio.sleep(2.2)
        r3 = await culler.run_pass()
        assert decisions(r3)["bob"] == ("cull", "idle")
        assert decisions(r3)["alice"][0] in ("warn", "keep")  # a new warning at most, never a cull
        assert "" not in hub.servers("bob")
        assert hub.servers("alice")[""]["ready"]
        kinds = [(e["event"], e["user"]) for e in events]
        assert ("cancelled", "alice") in kinds and ("culled", "bob") in kinds
        assert ("culled", "alice") not in kinds
        culler.hub.close()
    finally:
        server.stop()


async def test_own_kernel_reads_are_not_taken_for_user_activity(jupyterhub_factory, tmp_path):
    """The proxy records our kernel reads as route activity and the hub copies
    it into last_activity; the culler must not let that cancel its own cull."""
    from hubml.culler.hub import parse_time

    env = start_env(jupyterhub_factory, tmp_path, extra={"JupyterHub.last_activity_interval": 1})
    hub = env.hub
    hub.start_server("alice")
    # the server's own activity (api/status) stays at its start: our reads are untracked there
    env.fleet.set_server("alice", last_activity=iso(now()))
    await asyncio.sleep(3.5)
    _, culler = make_culler(env, "--grace-period=2s")
    before = parse_time(hub.servers("alice")[""]["last_activity"])
    r1 = await culler.run_pass()
    assert decisions(r1) == {"alice": ("warn", "idle")}
    await asyncio.sleep(2.5)
    after = parse_time(hub.servers("alice")[""]["last_activity"])
    assert after > before  # the premise: our read came back as hub activity
    r2 = await culler.run_pass()
    assert decisions(r2) == {"alice": ("cull", "idle")}
    assert "" not in hub.servers("alice")
    culler.hub.close()


async def test_user_activity_during_our_kernel_read_is_not_taken_for_the_echo(jupyterhub_factory, tmp_path):
    """Hub activity stamped while the pass was reading that server's kernels
    looks like the echo of the read, but here it is the user's: the server's
    own activity (api/status, which never counts our reads) moved too, so the
    re-check before the stop keeps the server."""
    env = start_env(jupyterhub_factory, tmp_path)
    hub = env.hub
    for user in ("alice", "bob"):
        hub.start_server(user)
        env.fleet.set_server(user, last_activity=iso(now()))
    await asyncio.sleep(3.5)
    proxy = FaultProxy(hub.url.rstrip("/")).start()
    try:
        app, culler = make_culler(env, "--grace-period=2s", f"--server-base-url={proxy.url}")
        r1 = await culler.run_pass()
        assert decisions(r1) == {"alice": ("warn", "idle"), "bob": ("warn", "idle")}
        await asyncio.sleep(2.2)
        # pass 2: alice works while the pass's read of her kernels is in flight
        held = proxy.add("GET", r"/user/alice/api/kernels", delay=1.5, times=1)
        task = asyncio.ensure_future(culler.run_pass())
        await wait_for_hit(held)
        t = now()
        env.fleet.set_server("alice", last_activity=iso(t))
        hub.set_activity("alice", t)
        r2 = await task
        d = decisions(r2)
        assert d["alice"] == ("keep", "activity-during-grace"), d
        assert {o.label: o.aborted for o in r2.outcomes}["alice"] == "cull"
        assert d["bob"] == ("cull", "idle")  # the control: idle, culled
        assert hub.servers("alice")[""]["ready"]
        assert "" not in hub.servers("bob")
        assert app.board.for_user("alice") == []
        culler.hub.close()
    finally:
        proxy.stop()


async def test_server_activity_newer_than_the_hub_keeps_the_server(jupyterhub_factory, tmp_path):
    """jupyterhub-singleuser reports activity to the hub only every few
    minutes; the re-check reads the server's own activity, so a user at work
    whose activity has not reached the hub yet is not culled."""
    env = start_env(jupyterhub_factory, tmp_path)
    hub = env.hub
    hub.start_server("alice")
    env.fleet.set_server("alice", last_activity=iso(now()))
    await asyncio.sleep(3.5)
    _, culler = make_culler(env)  # no grace: a cull decision goes straight to the stop
    env.fleet.set_server("alice", last_activity=iso(now()))  # the hub does not know yet
    report = await culler.run_pass()
    assert decisions(report) == {"alice": ("keep", "active")}
    assert {o.label: o.aborted for o in report.outcomes}["alice"] == "cull"
    assert hub.servers("alice")[""]["ready"]
    await asyncio.sleep(3.5)  # and once the server is idle too, it goes
    report = await culler.run_pass()
    assert decisions(report) == {"alice": ("cull", "idle")}
    assert "" not in hub.servers("alice")
    culler.hub.close()


async def test_cull_users_deletes_only_users_left_with_nothing(jupyterhub_factory, tmp_path):
    """``--cull-users`` (with admin:users granted) deletes a user whose every
    server this pass stopped, and no one else: not a user with a server that
    was kept, not a user whose stop was refused."""
    roles = [{"name": "hubml-culler", "scopes": CULLER_SCOPES + ["admin:users"], "services": [CULLER_SERVICE]}]
    env = start_env(jupyterhub_factory, tmp_path, extra={"JupyterHub.load_roles": roles})
    hub = env.hub
    for user in ("alice", "bob", "carol"):
        hub.start_server(user)
    hub.start_server("bob", "busy")
    await asyncio.sleep(3.5)
    hub.set_activity("bob", now(), server="busy")  # bob's named server is in use
    proxy = FaultProxy(hub.url.rstrip("/")).start()
    try:
        proxy.add("DELETE", r"/hub/api/users/carol/server$", status=500)  # carol's stop fails
        _, culler = make_culler(env, "--cull-users", api_url=proxy.url + "/hub/api")
        report = await culler.run_pass()
        d = decisions(report)
        assert d["alice"] == ("cull", "idle") and d["bob"] == ("cull", "idle")
        assert d["bob/busy"] == ("keep", "active")
        assert hub.api("GET", "/users/alice")[0] == 404  # deleted
        assert hub.api("GET", "/users/bob")[0] == 200  # kept: a server is still running
        assert hub.servers("bob")["busy"]["ready"] and "" not in hub.servers("bob")
        assert hub.api("GET", "/users/carol")[0] == 200  # kept: its stop was refused
        assert hub.servers("carol")[""]["ready"]
        culler.hub.close()
    finally:
        proxy.stop()


async def test_activity_between_decision_and_stop_cancels_it(jupyterhub_factory, tmp_path):
    """A pass decides on the snapshot it read, then re-reads each server right
    before warning or stopping it. Activity that reaches the hub in between
    (held here by delaying that re-read in the fault proxy while the user's
    activity is posted to the real hub) calls the warning or stop off."""
    env = start_env(jupyterhub_factory, tmp_path)
    hub = env.hub
    for user in ("alice", "bob", "carol", "dave"):
        hub.start_server(user)
    await asyncio.sleep(3.5)
    proxy = FaultProxy(hub.url.rstrip("/")).start()
    try:
        app, culler = make_culler(env, "--grace-period=2s", api_url=proxy.url + "/hub/api")
        metric = app.metrics.registry.get_sample_value

        # pass 1: everyone is idle; dave comes back while his re-read is in flight
        held = proxy.add("GET", r"/hub/api/users/dave$", delay=1.5, times=1)
        task = asyncio.ensure_future(culler.run_pass())
        await wait_for_hit(held)
        hub.set_activity("dave", now())
        r1 = await task
        assert decisions(r1) == {
            "alice": ("warn", "idle"), "bob": ("warn", "idle"),
            "carol": ("warn", "idle"), "dave": ("keep", "active"),
        }
        assert {o.label: o.aborted for o in r1.outcomes}["dave"] == "warn"
        assert app.board.for_user("dave") == []  # no stale warning shown
        assert metric("hubml_culler_cull_aborted_total", {"stage": "warn", "reason": "active"}) == 1

        # pass 2, after the grace period: alice comes back while her re-read is
        # held, carol's re-read fails, bob is still idle
        await asyncio.sleep(2.2)
        proxy.clear()
        held = proxy.add("GET", r"/hub/api/users/alice$", delay=1.5, times=1)
        proxy.add("GET", r"/hub/api/users/carol$", status=500)
        task = asyncio.ensure_future(culler.run_pass())
        await wait_for_hit(held)
        hub.set_activity("alice", now())
        r2 = await task
        d = decisions(r2)
        assert d["alice"] == ("keep", "activity-during-grace")
        assert d["carol"] == ("skip", "recheck-failed")
        assert d["bob"] == ("cull", "idle")
        assert d["dave"][0] in ("keep", "warn")  # idle again at most: never a cull
        deletes = [uri for method, uri in proxy.seen if method == "DELETE"]
        assert deletes == ["/hub/api/users/bob/server"]
        assert hub.servers("alice")[""]["ready"] and hub.servers("carol")[""]["ready"]
        assert hub.servers("dave")[""]["ready"]
        assert "" not in hub.servers("bob")
        assert app.board.for_user("alice") == []  # the warning was withdrawn
        assert metric("hubml_culler_cull_aborted_total", {"stage": "cull", "reason": "activity-during-grace"}) == 1
        assert metric("hubml_culler_cull_aborted_total", {"stage": "cull", "reason": "recheck-failed"}) == 1
        assert metric("hubml_culler_skipped_total", {"reason": "recheck-failed"}) == 1
        assert metric("hubml_culler_warnings_cancelled_total") == 1
        assert metric("hubml_culler_culls_total", {"reason": "idle", "profile": "default"}) == 1
        culler.hub.close()
    finally:
        proxy.stop()


async def test_faults_never_cause_a_wrong_cull(jupyterhub_factory, prometheus_factory, tmp_path):
    env = start_env(jupyterhub_factory, tmp_path)
    hub, fleet = env.hub, env.fleet
    for user in ("alice", "bob", "carol"):
        hub.start_server(user)
    hub.start_server("slow", options={"stop_delay": 3})
    hub.start_server("gpu", options={"profile": "a100"})
    await asyncio.sleep(3.5)
    proxy = FaultProxy(hub.url.rstrip("/")).start()
    api = proxy.url + "/hub/api"
    dead_prom = f"http://127.0.0.1:{free_port()}"  # nothing listens: Prometheus is down
    try:
        # 1. the user list answers 500
        proxy.add("GET", r"/hub/api/users\?", status=500)
        _, culler = make_culler(env, "--api-page-size=2", f"--prometheus-url={dead_prom}", api_url=api)
        r = await culler.run_pass()
        assert r.partial and r.by_action(Action.CULL) == []

        # 2. first page fine, second page 500: a partial list culls nothing
        proxy.clear()
        proxy.add("GET", r"/hub/api/users\?.*offset=2", status=503)
        r = await culler.run_pass()
        assert r.partial and len(r.outcomes) == 2
        assert {o.decision.reason for o in r.outcomes} == {"partial-user-list"}

        # 3. the user list hangs past the request timeout
        proxy.clear()
        proxy.add("GET", r"/hub/api/users\?", delay=3)
        _, slow_culler = make_culler(env, "--request-timeout=1", f"--prometheus-url={dead_prom}", api_url=api)
        r = await slow_culler.run_pass()
        assert r.partial and r.by_action(Action.CULL) == []
        slow_culler.hub.close()
        for user in ("alice", "bob", "carol", "slow", "gpu"):
            assert hub.servers(user)[""]["ready"], f"{user} culled during a hub fault"

        # 4. kernels hang (bob) or fail (carol), stop refused for alice (502),
        #    stop answered 202 for 'slow', Prometheus down for 'gpu'
        proxy.clear()
        fleet.set_server("bob", kernels=[], delay=3)
        fleet.set_server("carol", status=503)
        proxy.add("DELETE", r"/users/alice/server", status=502)
        _, culler2 = make_culler(env, "--kernel-timeout=1", f"--prometheus-url={dead_prom}", api_url=api)
        r = await culler2.run_pass()
        d = decisions(r)
        assert d["bob"] == ("skip", "kernels-unavailable")
        assert d["carol"] == ("skip", "kernels-unavailable")
        assert d["gpu"] == ("skip", "gpu-data-unavailable")
        assert d["alice"] == ("cull", "idle") and d["slow"] == ("cull", "idle")
        out = {o.label: o for o in r.outcomes}
        assert not out["alice"].stopped and "502" in out["alice"].error
        assert out["slow"].stop_pending and not out["slow"].stopped
        assert hub.servers("alice")[""]["ready"]  # the hub never got the stop
        for user in ("bob", "carol", "gpu"):
            assert hub.servers(user)[""]["ready"]
        # the next pass sees 'slow' stopping and does not ask again
        stops_before = culler2.hub.requests["stop"]
        r = await culler2.run_pass()
        if "slow" in decisions(r):
            assert decisions(r)["slow"][0] == "keep"
        assert culler2.hub.requests["stop"] - stops_before == 1  # only alice's retried stop
        culler2.hub.close()
        culler.hub.close()

        # the same GPU server with Prometheus up and reporting 0% is culled,
        # which shows the skip above came from the missing data
        fleet.set_gpu(NAMESPACE, "jupyter-gpu", [0])
        prom = prometheus_factory([fleet.metrics_target], scrape_interval="1s")
        prom.wait_for("DCGM_FI_DEV_GPU_UTIL")
        _, culler3 = make_culler(env, f"--prometheus-url={prom.url}")
        r = await culler3.run_pass()
        assert decisions(r)["gpu"] == ("cull", "idle")
        culler3.hub.close()
    finally:
        proxy.stop()


def test_dry_run_lists_and_changes_nothing(jupyterhub_factory, tmp_path):
    env = start_env(jupyterhub_factory, tmp_path)
    hub = env.hub
    hub.start_server("alice")
    hub.start_server("bob", options={"profile": "a100"})
    hub.start_server("carol")
    time.sleep(3.5)
    hub.set_activity("carol", now())
    res = run_cli(
        env, "--dry-run", "--timeout", "3s", f"--profiles={PROFILES}",
        "--server-base-url", hub.url.rstrip("/"),
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("would cull alice profile=- reason=idle") for line in lines), res.stdout
    bob = [line for line in lines if line.startswith("would cull bob ")]
    assert bob and "profile=a100" in bob[0] and "gpus=1" in bob[0]
    assert float(bob[0].rsplit("gpu_hours=", 1)[1]) > 0
    assert not any("carol" in line for line in lines)
    assert "2 server(s) would be culled" in lines[-1]
    for user in ("alice", "bob", "carol"):
        assert hub.servers(user)[""]["ready"]


BAD_ARGS = [
    (["--timeout=abc"], "not a duration"),
    (["--timeout", "-5"], "duration"),
    (["--grace-period=forever"], "not a duration"),
    (["--concurrency=0"], "at least 1"),
    (["--api-page-size", "0"], "at least 1"),
    (["--gpu-idle-threshold=101"], "percentage"),
    (["--cull-every=0"], "greater than 0"),
    (["--profiles={not json"], "does not parse"),
    (["--profiles=/does/not/exist.yaml"], "neither inline JSON"),
    (['--profiles={"a100": {"idle_timeout": "soon"}}'], "not a duration"),
    (['--profiles={"a100": {"gpus": 1}}'], "unknown keys"),
    (["--spawner-profiles=/nope.yaml"], "is not a file"),
    (["--prometheus-url=prometheus:9090"], "http(s) URL"),
    (["--webhook-url=ftp://x"], "http(s) URL"),
    (["--pod-name-template=jupyter-{user}"], "pod_name_template"),
    (["--tiemout=30m"], "unknown option --tiemout"),
    (["--CullerApp.nonsense=1"], "unknown option"),
    (["surprise"], "unexpected arguments"),
    (["--config=/no/such/config.py"], "does not exist"),
]


@pytest.mark.parametrize("bad, message", BAD_ARGS, ids=[" ".join(b) for b, _ in BAD_ARGS])
def test_cli_rejects_bad_input_and_changes_nothing(bad, message, cli_env, capsys):
    rc = main_with(cli_env, bad)
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert rc == 2
    assert message in err
    assert "Nothing was changed" in err
    assert cli_env.hub.servers("alice")[""]["ready"]


def test_cli_control_the_same_valid_arguments_do_cull(cli_env, capsys):
    """Shows the corpus above was refused for its bad value, not by accident."""
    rc = main_with(cli_env, ["--flag-that-does-not-exist"][:0])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "culled alice profile=- reason=idle" in out
    assert "" not in cli_env.hub.servers("alice")


def test_runs_as_hub_service_with_notices_and_metrics(jupyterhub_factory, tmp_path):
    """The hub starts ``python -m hubml.culler`` as a managed service with the
    documented role; users read their own notices through the proxy."""
    import urllib.error
    import urllib.request


    port = free_port()
    service = {
        "url": f"http://127.0.0.1:{port}",
        "command": [
            sys.executable, "-m", "hubml.culler",
            "--timeout=2s", "--grace-period=1h", "--cull-every=1s",
            "--server-base-url", "PLACEHOLDER",
        ],
    }
    from culler_env import hub_config
    import secrets

    from hubml_testing.singleuser_fleet import start_fleet

    fleet_port, public_port = free_port(), free_port()
    service["command"][-1] = f"http://127.0.0.1:{public_port}"
    cfg = hub_config(fleet_port, secrets.token_hex(16), service=service)
    hub = jupyterhub_factory(config=cfg, public_port=public_port)
    fleet = start_fleet(hub.api_url, hub.admin_token, tmp_path, port=fleet_port)
    try:
        assert cfg["JupyterHub.load_roles"][0]["scopes"] == CULLER_SCOPES
        hub.start_server("alice")
        hub.create_users("bob")
        alice_token = hub.create_token("alice")
        bob_token = hub.create_token("bob")

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        opener = urllib.request.build_opener(NoRedirect)

        def get(path, token=None):
            req = urllib.request.Request(hub.url + path, headers={"Authorization": f"token {token}"} if token else {})
            try:
                with opener.open(req, timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        deadline = time.monotonic() + 60
        notices: list = []
        while time.monotonic() < deadline:
            status, body = get("services/hubml-culler/notices", alice_token)
            if status == 200:
                notices = json.loads(body)["notices"]
                if notices:
                    break
            time.sleep(0.5)
        assert [(n["user"], n["server"], n["reason"]) for n in notices] == [("alice", "", "idle")]
        status, body = get("services/hubml-culler/notices", bob_token)
        assert status == 200 and json.loads(body) == {"notices": []}  # never someone else's
        status, page = get("services/hubml-culler/", alice_token)
        assert status == 200 and "will be stopped" in page
        status, _ = get("services/hubml-culler/notices")  # no credentials
        assert status in (302, 403)
        status, metrics = get("services/hubml-culler/metrics")
        assert status == 200 and 'hubml_culler_warnings_total{reason="idle"}' in metrics
        assert hub.servers("alice")[""]["ready"]  # grace period of an hour: not culled
    finally:
        fleet.stop()
