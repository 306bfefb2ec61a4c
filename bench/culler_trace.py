"""Trace replay: a week of GPU-server sessions against a real hub, once with
jupyterhub-idle-culler 2.0.0 (zero-to-jupyterhub defaults: timeout 3600 s,
every 600 s) and once with hubml's culler at its documented defaults (timeout
3600 s, GPU profile idle_timeout 30 min, GPU-idle window 30 min, grace 10 min,
every 60 s). Time is compressed: one trace hour = ``--seconds-per-hour`` real
seconds (default 1), every duration of both cullers scaled the same way.

The trace (seeded) has, per workday and user: a morning and an afternoon block
of interaction (a cell every 3-20 min, GPU busy 30 %), a lunch break, and an
end of day that is one of: stop the server (40 %), forget it idle (30 %), leave
a forgotten loop running — kernel busy, printing, GPU at 0 % (15 %) — or leave a
real training run (GPU 90 % for 2-10 h, 15 %). Forgotten servers stay over the
weekend. Busy kernels report activity every 5 min like jupyterhub-singleuser
does for kernel output. A culled server comes back when its user next works.

Definitions: *held* = GPU-server-hours running; *wasted* = held while nobody
interacts (outside the interaction blocks) and the GPU is idle (no training
run); *false cull* = a cull while the user works (inside a block or during a
training run).

Real components: JupyterHub 6.1.1 + configurable-http-proxy + the fleet
stand-in serving kernels through the proxy. The GPU utilisation comes from the
trace through hubml's GpuSource interface (a Prometheus scrape cannot follow a
clock 3,600 times faster than real time).

    .venv/bin/python bench/culler_trace.py [--users 12] [--seconds-per-hour 1] [--verbose]

``--verbose`` prints each false cull and, for hubml's, when its stop was sent
against the trace and against the replay's deliveries of the user's activity
(the replay itself runs behind the trace clock when the machine is loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import culler_setup  # noqa: E402
from tornado.httpclient import AsyncHTTPClient, HTTPRequest  # noqa: E402

WEEK_MIN = 7 * 24 * 60
OFF, BLOCK, LUNCH, FORGOT, LOOP, TRAIN, TRAINED = "off", "block", "lunch", "forgot", "loop", "train", "trained"


def make_trace(users: int, seed: int = 5) -> tuple[list[list[str]], list[set[int]]]:
    """Per user: intent per trace minute, and the minutes with an interaction."""
    rng = random.Random(seed)
    intents = [[OFF] * WEEK_MIN for _ in range(users)]
    interactions: list[set[int]] = [set() for _ in range(users)]
    for u in range(users):
        starts = []
        days = []
        for day in range(5):  # Monday to Friday
            if rng.random() < 0.85:
                base = day * 1440
                s = base + 9 * 60 + rng.randint(-60, 60)
                ls = base + 12 * 60 + rng.randint(-30, 30)
                le = ls + rng.randint(40, 75)
                e = base + 17 * 60 + rng.randint(-60, 60)
                days.append((s, ls, le, e))
                starts.append(s)
        for i, (s, ls, le, e) in enumerate(days):
            for m in range(s, ls):
                intents[u][m] = BLOCK
            for m in range(ls, le):
                intents[u][m] = LUNCH
            for m in range(le, e):
                intents[u][m] = BLOCK
            for a, b in ((s, ls), (le, e)):
                m = a
                while m < b:
                    interactions[u].add(m)
                    m += rng.randint(3, 20)
            nxt = days[i + 1][0] if i + 1 < len(days) else WEEK_MIN
            r = rng.random()
            if r < 0.40:
                outcome = [OFF] * (nxt - e)
            elif r < 0.70:
                outcome = [FORGOT] * (nxt - e)
            elif r < 0.85:
                outcome = [LOOP] * (nxt - e)
            else:
                run = min(rng.randint(120, 600), nxt - e)
                outcome = [TRAIN] * run + [TRAINED] * (nxt - e - run)
            intents[u][e:nxt] = outcome
    return intents, interactions


def working(intent: str) -> bool:
    return intent in (BLOCK, TRAIN)


def gpu_util(intent: str) -> float:
    return {BLOCK: 30.0, TRAIN: 90.0}.get(intent, 0.0)


class TraceGpuSource:
    """hubml GpuSource fed by the replay (per-pod change points, real time)."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.changes: dict[str, tuple[list[float], list[float]]] = {}
        self.requests = 0

    def set(self, pod: str, when: float, util: float) -> None:
        times, values = self.changes.setdefault(pod, ([], []))
        if values and values[-1] == util:
            return
        times.append(when)
        values.append(util)

    async def utilisation(self, pods, window, now):
        from hubml.culler.policy import GpuReading

        self.requests += 1
        out = {}
        end = now.timestamp()
        for ref in pods:
            times, values = self.changes.get(ref.pod, ([], []))
            samples = []
            t = end - window
            while t <= end + 1e-9:
                i = bisect.bisect_right(times, t) - 1
                if i >= 0:
                    samples.append((datetime.fromtimestamp(t, timezone.utc), values[i]))
                t += self.step
            out[ref] = GpuReading(ok=True, samples=tuple(samples))
        return out


class Replay:
    def __init__(self, env, intents, interactions, sph: float) -> None:
        self.env = env
        self.intents = intents
        self.interactions = interactions
        self.sph = sph
        self.users = [f"user{u:02d}" for u in range(len(intents))]
        self.client = AsyncHTTPClient(force_instance=True, max_clients=20)
        self.base = env.hub.api_url
        self.fleet = env.fleet.url
        self.gpu = TraceGpuSource(step=60 * sph / 3600)
        self.running: set[int] = set()  # what the replay believes is running
        self.lost: set[int] = set()  # culled: state lost until the next block
        self.held = self.wasted = 0
        self.false_culls = 0
        self.culls = 0
        self.fleet_state: dict[int, tuple] = {}
        self.verbose = False
        self.activity_log: dict[int, list[float]] = {}  # real times of activity POSTs
        self.stop_log: dict[str, list[tuple[float, float]]] = {}  # culler stops: (sent, answered)
        self.t0 = 0.0

    async def call(self, method, url, body=None, token=None):
        req = HTTPRequest(
            url, method=method, body=None if body is None else json.dumps(body),
            headers={"Authorization": f"token {token or self.env.hub.admin_token}", "Content-Type": "application/json"},
            allow_nonstandard_methods=True, request_timeout=60,
        )
        return await self.client.fetch(req, raise_error=False)

    async def ready_users(self) -> set[str]:
        resp = await self.call("GET", f"{self.base}/users?state=ready&limit=200")
        return {u["name"] for u in json.loads(resp.body)}

    async def set_fleet(self, u: int, state: str, busy: bool, conns: int, touch: bool) -> None:
        key = (state, busy, conns)
        if self.fleet_state.get(u) == key and not touch:
            return
        self.fleet_state[u] = key
        now = datetime.now(timezone.utc).isoformat()
        kernels = [{"id": f"k{u}", "execution_state": "busy" if busy else "idle", "last_activity": now, "connections": conns}]
        if not touch and u in self.last_kernel_touch:
            kernels[0]["last_activity"] = self.last_kernel_touch[u]
        else:
            self.last_kernel_touch[u] = now
        await self.call("PUT", f"{self.fleet}/_fleet/servers/{self.users[u]}/_", {"kernels": kernels})

    async def start_server(self, u: int) -> None:
        name = self.users[u]
        try:
            resp = await self.call("POST", f"{self.base}/users/{name}/server", {"profile": "a100"})
            if resp.code in (201, 202):
                self.running.add(u)
        finally:
            self.starting.discard(u)

    async def activity(self, u: int, minute: int = -1) -> None:
        now = datetime.now(timezone.utc).isoformat()
        self.activity_log.setdefault(u, []).append((time.time(), minute))
        await self.call("POST", f"{self.base}/users/{self.users[u]}/activity",
                        {"last_activity": now, "servers": {"": {"last_activity": now}}})

    def trace_minute(self, t: float) -> float:
        return (t - self.t0) / self.sph * 60

    def explain(self, u: int, name: str) -> None:
        """Print when the culler's stop was sent against what the trace says
        the user was doing then and when the replay delivered the user's
        return to the hub, to tell a stale decision from a stop already in
        flight before the hub could know the user was back."""
        stops = self.stop_log.get(name, [])
        if not stops:
            return  # jupyterhub-idle-culler: its stops are not instrumented
        sent, answered = stops[-1]
        ms = int(self.trace_minute(sent))
        intent = self.intents[u][ms] if 0 <= ms < WEEK_MIN else "?"
        back = ms
        while back > 0 and working(self.intents[u][back - 1]):
            back -= 1
        posts = [(round(self.trace_minute(t), 2), m) for t, m in self.activity_log.get(u, []) if m >= back][:2]
        before = [round(self.trace_minute(t), 2) for t, _ in self.activity_log.get(u, []) if t < sent][-1:]
        print(f"  {name}: culler stop sent at trace minute {self.trace_minute(sent):.2f} "
              f"(answered {'still in flight' if answered is None else f'{self.trace_minute(answered):.2f}'}); "
              f"trace intent then {intent!r}, working since minute {back}; last activity delivered before the "
              f"stop at {before}; first activity deliveries since the return (delivered at, for minute) {posts}",
              file=sys.stderr)
        echoes = [round(self.trace_minute(t), 2) for t in self.stop_log.get("echo:" + name, []) if t <= sent]
        if echoes:
            print(f"  {name}: hub activity taken for the echo of a kernel read (activity at) {echoes[-3:]}",
                  file=sys.stderr)

    async def run(self, culler_coro_factory) -> dict:
        self.last_kernel_touch: dict[int, str] = {}
        self.seen_ready: set[int] = set()
        self.starting: set[int] = set()
        resp = await self.call("POST", f"{self.base}/users", {"usernames": self.users})
        assert resp.code == 201, resp.body
        t0 = time.monotonic()
        self.t0 = time.time()
        stop = asyncio.Event()
        culler_task = asyncio.ensure_future(culler_coro_factory(stop))
        last_m = -1
        last_report = {u: -10 for u in range(len(self.users))}
        try:
            while last_m < WEEK_MIN - 1:
                m = min(int((time.monotonic() - t0) / self.sph * 60), WEEK_MIN - 1)
                if m == last_m:
                    await asyncio.sleep(0.002)
                    continue
                ready = await self.ready_users()
                for u, name in enumerate(self.users):
                    if u in self.running and name in ready:
                        self.seen_ready.add(u)
                    if u in self.seen_ready and u in self.running and name not in ready:
                        self.seen_ready.discard(u)
                        # stopped behind our back: the culler did it
                        self.running.discard(u)
                        self.culls += 1
                        self.lost.add(u)
                        # the cull happened somewhere in (last_m, m]: it is false
                        # when the user was working over that whole interval
                        if all(working(self.intents[u][x]) for x in range(max(last_m, 0), m + 1)):
                            self.false_culls += 1
                            if self.verbose:
                                print(f"false cull {name} minute {m} ({self.intents[u][max(last_m,0)]}->"
                                      f"{self.intents[u][m]}), lag {m - last_m} min", file=sys.stderr)
                                self.explain(u, name)
                for mm in range(last_m + 1, m + 1):
                    for u in range(len(self.users)):
                        intent = self.intents[u][mm]
                        if u in self.lost and intent == BLOCK:
                            self.lost.discard(u)  # the user is back and starts again
                        effective = OFF if u in self.lost else intent
                        if u in self.running:
                            self.held += 1
                            if not working(effective) and gpu_util(effective) == 0:
                                self.wasted += 1
                # apply the state at minute m
                now = time.time()
                jobs = []
                for u, name in enumerate(self.users):
                    intent = self.intents[u][m]
                    effective = OFF if u in self.lost else intent
                    if effective == OFF:
                        if u in self.running:
                            self.running.discard(u)
                            self.seen_ready.discard(u)
                            jobs.append(self.call("DELETE", f"{self.base}/users/{name}/server"))
                        self.gpu.set(f"jupyter-{name}", now, 0.0)
                        continue
                    if u not in self.running and u not in self.starting:
                        # start in the background: a spawn must not stall the clock
                        self.starting.add(u)
                        self.fleet_state.pop(u, None)
                        self.last_kernel_touch.pop(u, None)
                        asyncio.ensure_future(self.start_server(u))
                    self.gpu.set(f"jupyter-{name}", now, gpu_util(effective))
                    busy = effective in (LOOP, TRAIN)
                    conns = 1 if effective == BLOCK else 0
                    touched = any(mm in self.interactions[u] for mm in range(last_m + 1, m + 1)) and effective == BLOCK
                    jobs.append(self.set_fleet(u, effective, busy, conns, touched))
                    if touched:
                        jobs.append(self.activity(u, m))
                    elif busy and m - last_report[u] >= 5:  # singleuser reports kernel output
                        last_report[u] = m
                        jobs.append(self.activity(u))
                        self.last_kernel_touch.pop(u, None)
                await asyncio.gather(*jobs)
                last_m = m
        finally:
            stop.set()
            await culler_task
        return {
            "gpu_server_hours_held": round(self.held / 60, 1),
            "wasted_gpu_hours": round(self.wasted / 60, 1),
            "false_culls": self.false_culls,
            "culls": self.culls,
            "real_seconds": round(time.monotonic() - t0, 1),
        }


def idle_culler_loop(env, sph):
    from jupyterhub_idle_culler import cull_idle

    scale = sph / 3600
    log = logging.getLogger("idle-culler")
    log.setLevel(logging.ERROR)

    async def loop(stop: asyncio.Event):
        while not stop.is_set():
            try:
                await cull_idle(url=env.hub.api_url, api_token=env.token, inactive_limit=3600 * scale,
                                logger=log, concurrency=10)
            except Exception as e:  # keep replaying; count nothing
                log.error("idle-culler pass failed: %s", e)
            try:
                await asyncio.wait_for(stop.wait(), 600 * scale)
            except asyncio.TimeoutError:
                pass

    return loop


def hubml_loop(env, sph, gpu_source, stop_log=None):
    from hubml.culler.app import CullerApp

    scale = sph / 3600

    def d(seconds):
        return f"{seconds * scale:.6f}"

    app = CullerApp()
    app.initialize([
        f"--api-url={env.hub.api_url}", f"--server-base-url={env.hub.url.rstrip('/')}",
        f"--CullerApp.api_token={env.token}", "--log-level=ERROR",
        f"--timeout={d(3600)}", f"--grace-period={d(600)}", f"--gpu-idle-window={d(1800)}",
        f"--cull-every={d(60)}", f"--prometheus-step={d(60)}",
        "--profiles=" + json.dumps({"a100": {"idle_timeout": d(1800), "gpu": 1}}),
    ])
    culler = app.build()
    culler.gpu_source = gpu_source
    if stop_log is not None:  # diagnostics for --verbose: when each stop was sent
        real_stop = culler.hub.stop_server

        async def stop_server(user, name, **kw):
            entry = [time.time(), None]  # sent, answered (None while in flight)
            stop_log.setdefault(user, []).append(entry)
            result = await real_stop(user, name, **kw)
            entry[1] = time.time()
            return result

        culler.hub.stop_server = stop_server
        real_discount = culler._discount_own_reads

        def discount(snap, now):  # when hub activity was taken for the echo of a kernel read
            out = real_discount(snap, now)
            if out.last_activity != snap.last_activity:
                stop_log.setdefault("echo:" + snap.user, []).append(snap.last_activity.timestamp())
            return out

        culler._discount_own_reads = discount

    import collections

    reasons: collections.Counter = collections.Counter()

    async def loop(stop: asyncio.Event):
        while not stop.is_set():
            report = await culler.run_pass()
            if report:
                reasons.update((o.decision.action.value, o.decision.reason) for o in report.outcomes)
                reasons.update((f"{o.aborted}-called-off", o.decision.reason) for o in report.outcomes if o.aborted)
            try:
                await asyncio.wait_for(stop.wait(), app.cull_every)
            except asyncio.TimeoutError:
                pass
        culler.hub.close()
        print("hubml decisions:", dict(reasons), file=sys.stderr)

    return loop


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--seconds-per-hour", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--verbose", action="store_true", help="print each false cull")
    ap.add_argument("--only", choices=("hubml", "jupyterhub-idle-culler"), default=None,
                    help="replay one culler only (diagnostics; the ratio needs both)")
    args = ap.parse_args()
    intents, interactions = make_trace(args.users, args.seed)
    results = {}
    for name in ("jupyterhub-idle-culler", "hubml"):
        if args.only and name != args.only:
            continue
        env = culler_setup.start({"JupyterHub.cleanup_servers": True})
        try:
            replay = Replay(env, intents, interactions, args.seconds_per_hour)
            replay.verbose = args.verbose
            if name == "hubml":
                loop = hubml_loop(env, args.seconds_per_hour, replay.gpu, replay.stop_log)
            else:
                loop = idle_culler_loop(env, args.seconds_per_hour)
            results[name] = asyncio.run(replay.run(loop))
            print(name, json.dumps(results[name]), flush=True)
        finally:
            env.stop()
    if args.only:
        return
    ours, theirs = results["hubml"], results["jupyterhub-idle-culler"]
    ratio = ours["wasted_gpu_hours"] / theirs["wasted_gpu_hours"] if theirs["wasted_gpu_hours"] else float("nan")
    print(json.dumps({"machine": culler_setup.machine(), "users": args.users,
                      "seconds_per_trace_hour": args.seconds_per_hour, **{k: v for k, v in results.items()}}, indent=2))
    print(f"RATIO wasted GPU-hours hubml/idle-culler = {ratio:.2f} (target <= 0.40); "
          f"held ratio = {ours['gpu_server_hours_held'] / theirs['gpu_server_hours_held']:.2f}; "
          f"false culls hubml={ours['false_culls']} idle-culler={theirs['false_culls']}")


if __name__ == "__main__":
    main()
