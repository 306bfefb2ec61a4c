"""One cull pass: gather snapshots concurrently, decide, act.

The pass streams the hub's user pages (next page prefetched) and starts the
kernel reads for each server as soon as its user arrives; reads share the hub
client's concurrency bound. GPU utilisation is fetched once per pass for all
GPU servers, with the last busy sample over the longest GPU ``idle_timeout``. Only when the whole user list arrived does the pass act: with a
partial list nothing is culled and every server seen is counted as skipped.
Acting comes seconds after reading, so every warning and stop is preceded by a
re-read of that one server and the same pure decision on the fresh snapshot
(:meth:`Culler._recheck`, :func:`~hubml.culler.policy.reconfirm`): a user who
came back in between is not culled, and a failed re-read culls nothing.
A lock makes overlapping passes impossible: a pass that finds the previous one
still running returns ``None`` at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .gpu import GpuSource, PodRef
from .hub import HubClient, HubError, parse_time
from .metrics import CullerMetrics
from .notify import Notice, Notifier
from .pods import pod_name
from .policy import (
    Action,
    Decision,
    GraceState,
    Kernel,
    PolicyConfig,
    ServerSnapshot,
    decide,
    gpu_lookback,
    reconfirm,
    track_attention,
    track_kernels,
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Outcome:
    user: str
    server: str
    profile: str | None
    decision: Decision
    stopped: bool = False
    stop_pending: bool = False
    error: str = ""
    #: the action the pass had decided and the re-check called off ("" if none)
    aborted: str = ""

    @property
    def label(self) -> str:
        return f"{self.user}/{self.server}" if self.server else self.user


@dataclass
class PassReport:
    started: datetime
    duration: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    partial: bool = False
    error: str = ""
    requests: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False

    def by_action(self, action: Action) -> list[Outcome]:
        return [o for o in self.outcomes if o.decision.action == action]

    def decision_for(self, user: str, server: str = "") -> Decision:
        for o in self.outcomes:
            if o.user == user and o.server == server:
                return o.decision
        raise KeyError(f"{user}/{server} not in pass")

    def render(self, now: datetime) -> str:
        """Human listing (used by ``--dry-run``)."""
        lines = []
        culls = [o for o in self.outcomes if o.decision.action == Action.CULL]
        total = 0.0
        for o in culls:
            h = o.decision.idle_gpu_hours(now)
            total += h
            idle = "?" if o.decision.idle_since is None else str(now - o.decision.idle_since).split(".")[0]
            lines.append(
                f"{'would cull' if self.dry_run else 'culled'} {o.label} "
                f"profile={o.profile or '-'} reason={o.decision.reason} idle={idle} "
                f"gpus={o.decision.gpus} gpu_hours={h:.4f}"
            )
        skipped = self.by_action(Action.SKIP)
        for o in skipped:
            lines.append(f"skipped {o.label}: {o.decision.reason} {o.decision.detail}".rstrip())
        lines.append(
            f"{len(culls)} server(s) {'would be ' if self.dry_run else ''}culled, "
            f"{total:.2f} idle GPU-hours {'would be ' if self.dry_run else ''}reclaimed, "
            f"{len(skipped)} skipped for missing data, {len(self.outcomes)} seen"
            + (f"; user list partial: {self.error}" if self.partial else "")
        )
        return "\n".join(lines)


class Culler:
    """Holds the clients and the state carried between passes."""

    def __init__(
        self,
        hub: HubClient,
        policy: PolicyConfig,
        *,
        gpu_source: GpuSource | None = None,
        gpu_step: float = 60,
        pod_name_template: str = "jupyter-{user_server}",
        namespace: str = "default",
        notifiers: Sequence[Notifier] = (),
        metrics: CullerMetrics | None = None,
        dry_run: bool = False,
        remove_named_servers: bool = False,
        cull_users: bool = False,
        clock: Callable[[], datetime] = utcnow,
        log: logging.Logger | None = None,
    ) -> None:
        self.hub = hub
        self.policy = policy
        self.gpu_source = gpu_source
        self.gpu_step = gpu_step
        self.pod_name_template = pod_name_template
        self.namespace = namespace
        self.notifiers = list(notifiers)
        self.metrics = metrics or CullerMetrics()
        self.dry_run = dry_run
        self.remove_named_servers = remove_named_servers
        self.cull_users = cull_users
        self.clock = clock
        self.log = log or logging.getLogger("hubml.culler")
        self._lock = asyncio.Lock()
        self.busy_runs: dict[tuple[str, str], dict[str, datetime]] = {}
        self.unattended: dict[tuple[str, str], datetime | None] = {}
        self.grace: dict[tuple[str, str], GraceState] = {}
        self.last_report: PassReport | None = None
        # our own kernel reads, and the last hub activity that was not their echo
        self.own_reads: dict[tuple[str, str], list[tuple[datetime, datetime]]] = {}
        self.true_activity: dict[tuple[str, str], datetime] = {}
        self.urls: dict[tuple[str, str], str] = {}  # server URLs of the current pass

    # ------------------------------------------------------------------ pass
    async def run_pass(self) -> PassReport | None:
        if self._lock.locked():
            self.log.warning("previous cull pass still running; not starting another")
            return None
        async with self._lock:
            t0 = time.perf_counter()
            before = dict(self.hub.requests)
            report = await self._pass()
            report.duration = time.perf_counter() - t0
            report.requests = {
                k: v - before.get(k, 0) for k, v in self.hub.requests.items() if v - before.get(k, 0)
            }
            if self.gpu_source is not None and hasattr(self.gpu_source, "requests"):
                report.requests["prometheus"] = getattr(self.gpu_source, "requests")
            self.metrics.pass_duration.observe(report.duration)
            self.last_report = report
            return report

    def _base_snapshot(self, user: dict, name: str, server: dict) -> ServerSnapshot:
        opts = server.get("user_options")
        profile = opts.get("profile") if isinstance(opts, dict) else None
        if profile is not None and not isinstance(profile, str):
            profile = str(profile)
        return ServerSnapshot(
            user=user["name"],
            name=name,
            profile=profile,
            ready=bool(server.get("ready")),
            pending=server.get("pending"),
            started=parse_time(server.get("started")),
            last_activity=parse_time(server.get("last_activity")),
        )

    def _needs_kernels(self, snap: ServerSnapshot, now: datetime) -> bool:
        """Kernels only matter if they can change the decision.

        A CPU server whose hub activity is recent and that is younger than its
        max age is kept whatever its kernels do, so we spare that request.
        GPU servers are always read, to follow busy runs and attention.
        """
        if not self.policy.use_kernels or not snap.ready or snap.pending:
            return False
        prof = self.policy.for_profile(snap.profile)
        if prof.gpus:
            return True
        if snap.last_activity is None or snap.started is None:
            return False  # skipped anyway
        idle = (now - snap.last_activity).total_seconds()
        old = prof.max_age and (now - snap.started).total_seconds() >= prof.max_age
        return idle >= prof.idle_timeout or bool(old) or snap.key in self.grace

    #: the proxy stamps our request while it is in flight, so its echo lies inside the read
    #: window, but configurable-http-proxy stamps with a JavaScript Date: milliseconds,
    #: truncated. On a quiet machine a read reaches it within the millisecond it began, and
    #: the echo then reads up to 1 ms before the window (CI saw that: a cull cancelled by
    #: our own read)
    ECHO_SLACK = timedelta(milliseconds=1)

    def _discount_own_reads(
        self, snap: ServerSnapshot, now: datetime, server_activity: datetime | None = None
    ) -> ServerSnapshot:
        """Undo the echo of our own kernel reads in the hub's ``last_activity``.

        configurable-http-proxy counts every proxied request as activity and the
        hub copies that into ``last_activity``; a hub ``last_activity`` falling
        inside one of our reads of that server may be our echo — or the user,
        active at that same moment. ``server_activity`` (the server's own
        ``last_activity``, which never holds our reads; the re-check before a
        warning or stop reads it) tells them apart: the user's activity reached
        the server no later than the hub, so the server saw something since
        the read began. Without it (a pass), an in-window value counts as the
        echo and the last value that was not is used instead; without such a
        value the echo is kept (it errs towards keeping the server). A server
        activity newer than the hub's is used as it is: jupyterhub-singleuser
        reports to the hub only every ``JUPYTERHUB_ACTIVITY_INTERVAL`` (5 min).
        """
        key, la = snap.key, snap.last_activity
        reads = [r for r in self.own_reads.get(key, []) if r[1] > now - timedelta(hours=2)]
        self.own_reads[key] = reads
        if la is None:
            return snap
        window = next(
            ((start, end) for start, end in reads if start - self.ECHO_SLACK <= la <= end + self.ECHO_SLACK), None
        )
        if window is None or (server_activity is not None and server_activity >= window[0] - self.ECHO_SLACK):
            self.true_activity[key] = la
        else:
            known = [t for t in (self.true_activity.get(key), server_activity) if t is not None]
            if known:
                snap = _replace(snap, last_activity=max(known))
        if server_activity is not None and snap.last_activity is not None and server_activity > snap.last_activity:
            # the single-user server reports to the hub only every few minutes
            snap = _replace(snap, last_activity=server_activity)
        return snap

    async def _with_kernels(self, snap: ServerSnapshot, server_url: str) -> ServerSnapshot:
        # What the kernels show is stamped with when the answer came, not with the pass's
        # start: on a busy hub the user list alone can take seconds, and a busy run or an
        # empty room first seen in this answer may have begun only just before it. Dating
        # it earlier would cull a forgotten loop that much before its idle_timeout.
        kernels, err, seen_at = await self._read_kernels(snap.key, server_url)
        return self._apply_kernels(snap, kernels, err, seen_at)

    async def _read_kernels(
        self, key: tuple[str, str], server_url: str
    ) -> tuple[tuple[Kernel, ...] | None, str, datetime]:
        started = self.clock()
        kernels, err = await self.hub.kernels(server_url)
        ended = self.clock()
        self.own_reads.setdefault(key, []).append((started, ended))
        return kernels, err, ended

    def _apply_kernels(
        self, snap: ServerSnapshot, kernels: tuple[Kernel, ...] | None, err: str, now: datetime
    ) -> ServerSnapshot:
        if kernels is None:
            return _replace(snap, kernels=None, kernels_error=err)
        tracked, runs = track_kernels(self.busy_runs.get(snap.key, {}), kernels, now)
        self.busy_runs[snap.key] = runs
        unattended = track_attention(self.unattended.get(snap.key), tracked, now)
        self.unattended[snap.key] = unattended
        return _replace(snap, kernels=tracked, unattended_since=unattended)

    async def _pass(self) -> PassReport:
        now = self.clock()
        report = PassReport(started=now, dry_run=self.dry_run)
        entries: list[tuple[dict, str, asyncio.Future]] = []

        async def plain(s: ServerSnapshot) -> ServerSnapshot:
            # kernels cannot change this server's decision (see _needs_kernels)
            return _replace(s, kernels=()) if s.ready and not s.pending else s

        try:
            async for user in self.hub.users_with_ready_servers():
                servers = user.get("servers")
                if not isinstance(servers, dict):
                    continue
                for name, server in servers.items():
                    snap = self._discount_own_reads(self._base_snapshot(user, name, server), now)
                    self.urls[snap.key] = server.get("url", "")
                    if self._needs_kernels(snap, now):
                        fut = asyncio.ensure_future(self._with_kernels(snap, server.get("url", "")))
                    else:
                        fut = asyncio.ensure_future(plain(snap))
                    entries.append((user, name, fut))
        except (HubError, OSError, asyncio.TimeoutError) as e:
            report.partial = True
            report.error = str(e)
            self.metrics.pass_errors.inc()
            self.log.error("user list incomplete, culling nothing this pass: %s", e)

        snaps = list(await asyncio.gather(*(f for _, _, f in entries)))
        self.metrics.servers_seen.set(len(snaps))
        seen = {s.key for s in snaps}
        for key in list(self.busy_runs):
            if key not in seen and not report.partial:
                self.busy_runs.pop(key, None)
                self.unattended.pop(key, None)
        for key in list(self.own_reads):
            if key not in seen and not report.partial:
                self.own_reads.pop(key, None)
                self.true_activity.pop(key, None)

        # GPU utilisation, one query for every GPU server of the pass
        gpu_pods: dict[tuple[str, str], PodRef] = {}
        for s in snaps:
            if self.policy.for_profile(s.profile).gpus and s.ready and not s.pending:
                gpu_pods[s.key] = PodRef(self.namespace, pod_name(self.pod_name_template, s.user, s.name))
        readings = {}
        if gpu_pods and self.gpu_source is not None:
            # the last busy sample is looked up over idle_timeout, not only the window (rule 3)
            readings = await self.gpu_source.utilisation(
                set(gpu_pods.values()), self.policy.gpu_idle_window, now,
                lookback=gpu_lookback(self.policy), threshold=self.policy.gpu_idle_threshold,
            )
        decisions: list[tuple[ServerSnapshot, Decision]] = []
        for s in snaps:
            if s.key in gpu_pods:
                s = _replace(s, gpu=readings.get(gpu_pods[s.key]))
            policy = self.policy
            if self.dry_run:
                policy = _replace(policy, grace_period=0)
            if report.partial:
                d = Decision(Action.SKIP, "partial-user-list", detail=report.error)
            else:
                d = decide(s, policy, self.grace.get(s.key), now, gpu_step=self.gpu_step)
            decisions.append((s, d))

        acts = [self._act(s, d, now) for s, d in decisions]
        report.outcomes = list(await asyncio.gather(*acts))
        if self.cull_users and not self.dry_run and not report.partial:
            await self._cull_users(report)
        return report

    async def _recheck(self, s: ServerSnapshot) -> tuple[ServerSnapshot, Decision, datetime]:
        """Re-read one server just before warning or stopping it and decide again.

        A pass reads every server, then acts; a user who came back in between
        (a stop lands seconds after the read) would be culled on stale data.
        So the server's fresh model is read from the hub (its ``last_activity``,
        ``ready``, ``pending``) and, when its kernels can matter, its kernels
        too; the pass's GPU reading is reused (GPU activity is at most an extra
        reason to keep). Requests take the same concurrency slots as the rest
        of the pass. A failed re-read is missing data: a ``SKIP``, never a cull.
        """
        # the hub first, the server last: a returning user's activity reaches
        # the server (kernels, api/status) before the hub hears of it, so the
        # stop follows the freshest source at once
        now = self.clock()
        try:
            model = await self.hub.user(s.user)
        except HubError as e:
            return s, Decision(Action.SKIP, "recheck-failed", detail=str(e)), now
        servers = model.get("servers")
        server = servers.get(s.name) if isinstance(servers, dict) else None
        if not isinstance(server, dict):
            # not in the model: stopped meanwhile, or the model is incomplete
            return s, Decision(Action.KEEP, "server-gone"), now
        base = self._base_snapshot(model, s.name, server)
        kernels: tuple[Kernel, ...] | None = ()
        err = ""
        # whatever made the pass read this server's kernels still holds for a cull
        read = self._needs_kernels(s, now) and base.ready and not base.pending
        read_window = None
        server_activity = None
        if read:
            # the server's own activity tells our echo from the user's (see
            # _discount_own_reads); read with the kernels, so it costs no round trip
            started = self.clock()
            url = self.urls.get(s.key, "")
            (kernels, err), (server_activity, _) = await asyncio.gather(
                self.hub.kernels(url), self.hub.server_activity(url)
            )
            read_window = (started, self.clock())
        now = self.clock()
        # this re-check's own reads cannot have echoed into the hub model read
        # before them (only earlier reads are discounted)
        fresh = self._discount_own_reads(base, now, server_activity)
        if read_window is not None:
            self.own_reads.setdefault(s.key, []).append(read_window)
        if read:
            fresh = self._apply_kernels(fresh, kernels, err, now)
        elif fresh.ready and not fresh.pending:
            fresh = _replace(fresh, kernels=())  # the pass did not need them either
        fresh = _replace(fresh, gpu=s.gpu)
        d = decide(fresh, self.policy, self.grace.get(s.key), now, gpu_step=self.gpu_step)
        return fresh, d, now

    async def _act(self, s: ServerSnapshot, d: Decision, now: datetime) -> Outcome:
        if d.action in (Action.WARN, Action.CULL) and not self.dry_run:
            fresh, fd, fnow = await self._recheck(s)
            go, why = reconfirm(d, fd)
            if not go:
                stage = "cull" if d.action == Action.CULL else "warn"
                self.metrics.aborted.labels(stage, why).inc()
                self.log.info(
                    "%s of %s called off on re-check just before acting: %s %s",
                    "stop" if stage == "cull" else "warning", s.label, why, fd.detail,
                )
                out = await self._apply(fresh, fd, fnow)
                out.aborted = d.action.value
                return out
            s, d, now = fresh, fd, fnow
        return await self._apply(s, d, now)

    async def _apply(self, s: ServerSnapshot, d: Decision, now: datetime) -> Outcome:
        out = Outcome(s.user, s.name, s.profile, d)
        profile = s.profile or "default"
        if d.action == Action.SKIP:
            self.metrics.skipped.labels(d.reason).inc()
            self.log.info("skipping %s: %s %s", s.label, d.reason, d.detail)
            return out
        if self.dry_run:
            return out
        had_grace = s.key in self.grace
        if d.grace is not None:
            self.grace[s.key] = d.grace
        else:
            self.grace.pop(s.key, None)
        if d.action == Action.WARN:
            self.metrics.warnings.labels(d.reason).inc()
            notice = Notice(
                user=s.user, server=s.name, reason=d.reason, profile=s.profile, gpus=d.gpus,
                idle_since=d.idle_since, warned_at=now,
                cull_at=now + timedelta(seconds=self.policy.grace_period),
            )
            self.log.info("warning %s: %s, cull at %s", s.label, d.reason, notice.cull_at)
            await asyncio.gather(*(n.warn(notice) for n in self.notifiers))
        elif d.action == Action.KEEP and had_grace:
            self.metrics.cancelled.inc()
            self.log.info("cull of %s cancelled: %s", s.label, d.reason)
            await asyncio.gather(*(n.cancel(s.user, s.name, d.reason) for n in self.notifiers))
        elif d.action == Action.CULL:
            self.log.info("culling %s: %s (profile %s)", s.label, d.reason, profile)
            result = await self.hub.stop_server(s.user, s.name, remove=self.remove_named_servers)
            out.stopped, out.stop_pending, out.error = result.stopped, result.pending, result.error
            if result.stopped or result.pending:
                self.grace.pop(s.key, None)
                self.busy_runs.pop(s.key, None)
                self.unattended.pop(s.key, None)
                self.metrics.culls.labels(d.reason, profile).inc()
                self.metrics.gpu_hours.labels(profile).inc(d.idle_gpu_hours(now))
                if result.pending:
                    self.metrics.stop_pending.inc()
                await asyncio.gather(*(n.culled(s.user, s.name, d.reason) for n in self.notifiers))
            else:
                self.log.error("stopping %s failed: %s", s.label, result.error)
        return out

    async def _cull_users(self, report: PassReport) -> None:
        """Delete users whose every server this pass stopped (204, not 202)."""
        per_user: dict[str, list[Outcome]] = {}
        for o in report.outcomes:
            per_user.setdefault(o.user, []).append(o)
        for user, outs in per_user.items():
            if all(o.stopped for o in outs):
                if await self.hub.delete_user(user):
                    self.log.info("deleted user %s", user)


def _replace(obj: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(obj, **changes)
