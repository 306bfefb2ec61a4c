"""Pure cull decisions: no I/O, no clock, no globals.

Everything the culler knows about one server at one moment is a
:class:`ServerSnapshot`; :func:`decide` turns it (plus the policy, the grace
state carried over from earlier passes and ``now``) into a :class:`Decision`.
Keeping this apart from the hub/Prometheus clients lets the tests and the
benchmark check every rule server by server without timing games, in the same
spirit as KubeSpawner keeping ``objects.py`` apart from ``spawner.py``.

Rules, in order:

1. pending / not-ready servers and excluded kinds (default vs named) are kept;
2. missing or inconsistent data (no ``last_activity``/``started``, timestamps in
   the future, kernels unreadable, GPU data unavailable for a GPU profile) →
   ``SKIP`` with a reason; a skip is never a cull;
3. activity = the latest of the hub's ``last_activity``, idle kernels'
   ``last_activity`` and the last GPU sample above the threshold — looked up
   over the profile's ``idle_timeout`` (:func:`gpu_lookback`), not only over
   the GPU-idle window, so a training run that ended keeps its server for
   ``idle_timeout`` after its last busy sample;
4. a busy kernel is activity, except the *forgotten loop*: GPU utilisation at or
   below the threshold for the whole GPU-idle window, every busy kernel busy
   without a break since before the window (no cell started) and no client
   connected to any kernel since before the window (no one touched it).
   Then the hub's ``last_activity`` is disregarded, because jupyterhub-singleuser
   reports kernel output as activity, and the server is idle since the latest
   of those moments;
5. idle for the profile's ``idle_timeout`` → cull reason ``idle`` (or
   ``gpu-idle``); older than ``max_age`` → ``max-age``;
6. with a grace period, the first such decision is a ``WARN``; any new activity
   before the period ends cancels it (``max-age`` is a hard limit and is not
   cancelled); after the period the decision is ``CULL``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

#: kernel states that mean "a cell is running" (jupyter_server execution_state)
BUSY_STATES = frozenset({"busy", "starting", "restarting", "autorestarting"})
#: states that mean the kernel is not doing anything
IDLE_STATES = frozenset({"idle", "dead"})

#: clock skew we tolerate between hub, Prometheus and the culler
CLOCK_SKEW = timedelta(seconds=60)


class Action(str, enum.Enum):
    KEEP = "keep"
    SKIP = "skip"  # missing/inconsistent data: never culled, counted
    WARN = "warn"  # first notice, grace period starts
    GRACE = "grace"  # already warned, grace period running
    CULL = "cull"


@dataclass(frozen=True)
class ProfilePolicy:
    """Timeouts for one profile. Seconds; ``max_age`` 0 means no limit."""

    idle_timeout: float
    max_age: float = 0
    gpus: int = 0


@dataclass(frozen=True)
class PolicyConfig:
    default: ProfilePolicy
    profiles: Mapping[str, ProfilePolicy] = field(default_factory=dict)
    gpu_idle_window: float = 1800
    gpu_idle_threshold: float = 0.0
    grace_period: float = 600
    cull_default_servers: bool = True
    cull_named_servers: bool = True
    use_kernels: bool = True

    def for_profile(self, profile: str | None) -> ProfilePolicy:
        """The profile's policy; unknown or absent profiles get the default."""
        if profile is not None and profile in self.profiles:
            return self.profiles[profile]
        return self.default


@dataclass(frozen=True)
class Kernel:
    """One kernel as the culler saw it, plus what it tracked across passes."""

    id: str
    execution_state: str
    last_activity: datetime | None
    connections: int = 0
    busy_since: datetime | None = None  # first observation of the current busy run


@dataclass(frozen=True)
class GpuReading:
    """GPU utilisation samples (percent) for the server's pod over the window.

    ``last_busy`` is the last sample above the threshold over the longer
    look-back of :func:`gpu_lookback` (None: none in it), which the window's
    samples alone cannot tell once a run ended more than a window ago. It comes
    from the source (Prometheus keeps the history), not from the culler's
    memory, so a restarted culler knows it as well as a running one.

    ``ok`` False means the source could not say (source down, no series for the
    pod): a GPU server is then skipped, never culled.
    """

    ok: bool
    samples: tuple[tuple[datetime, float], ...] = ()
    error: str = ""
    last_busy: datetime | None = None


@dataclass(frozen=True)
class ServerSnapshot:
    user: str
    name: str  # "" for the default server
    profile: str | None
    ready: bool
    pending: str | None
    started: datetime | None
    last_activity: datetime | None
    kernels: tuple[Kernel, ...] | None = None  # None: could not read them
    kernels_error: str = ""
    unattended_since: datetime | None = None  # no client on any kernel since
    gpu: GpuReading | None = None  # None: not asked (CPU profile)

    @property
    def key(self) -> tuple[str, str]:
        return (self.user, self.name)

    @property
    def label(self) -> str:
        return f"{self.user}/{self.name}" if self.name else self.user


@dataclass(frozen=True)
class GraceState:
    """What the culler remembers after warning a user."""

    warned_at: datetime
    idle_since: datetime
    reason: str


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    idle_since: datetime | None = None
    grace: GraceState | None = None  # state to keep for the next pass
    gpus: int = 0
    detail: str = ""

    def idle_gpu_hours(self, now: datetime) -> float:
        """GPU-hours held idle so far, i.e. what a cull now stops wasting."""
        if not self.gpus or self.idle_since is None:
            return 0.0
        return self.gpus * max(0.0, (now - self.idle_since).total_seconds()) / 3600


def track_kernels(
    previous: Mapping[str, datetime],
    observed: Iterable[Kernel],
    now: datetime,
) -> tuple[tuple[Kernel, ...], dict[str, datetime]]:
    """Carry each kernel's busy run across passes.

    A kernel seen busy for the first time is busy since *now*, the moment its
    state was read: we cannot know when an unseen run started, so after a
    culler restart the forgotten-loop rule waits a full window again. That errs
    toward keeping servers.
    """
    out: list[Kernel] = []
    state: dict[str, datetime] = {}
    for k in observed:
        if k.execution_state in BUSY_STATES:
            since = previous.get(k.id, now)
            state[k.id] = since
            out.append(replace(k, busy_since=since))
        else:
            out.append(replace(k, busy_since=None))
    return tuple(out), state


def track_attention(
    previous: datetime | None, kernels: Iterable[Kernel], now: datetime
) -> datetime | None:
    """Since when no client has been connected to any kernel (None: someone is)."""
    if any(k.connections > 0 for k in kernels):
        return None
    return previous if previous is not None else now


def gpu_lookback(cfg: PolicyConfig) -> float:
    """Seconds of GPU history a source must search for the last busy sample.

    A busy sample older than a GPU profile's ``idle_timeout`` cannot keep its
    server any more, so the longest such timeout is what the decision needs.
    The grace period and one GPU-idle window more keep that sample in view
    until the cull comes (passes run far more often than once a window), so
    the cull's ``idle_since``, and the idle GPU-hours it reports, start from it
    rather than from older activity.
    """
    timeouts = [p.idle_timeout for p in (cfg.default, *cfg.profiles.values()) if p.gpus]
    return max(timeouts, default=0.0) + max(cfg.grace_period, 0.0) + cfg.gpu_idle_window


def _gpu_summary(
    reading: GpuReading, window_start: datetime, threshold: float, step: float
) -> tuple[datetime | None, bool]:
    """(last time above threshold, whether the window is covered and all idle)."""
    last_active: datetime | None = None
    for t, value in reading.samples:
        if value > threshold and (last_active is None or t > last_active):
            last_active = t
    times = [t for t, _ in reading.samples]
    covered = bool(times) and min(times) <= window_start + timedelta(seconds=step)
    all_idle = covered and last_active is None
    if reading.last_busy is not None and (last_active is None or reading.last_busy > last_active):
        last_active = reading.last_busy
        all_idle = all_idle and reading.last_busy < window_start  # busy before the window only
    return last_active, all_idle


def decide(
    snap: ServerSnapshot,
    cfg: PolicyConfig,
    grace: GraceState | None,
    now: datetime,
    *,
    gpu_step: float = 60,
) -> Decision:
    """Decide what to do with one server (see the module docstring for rules).

    ``gpu_step`` is the spacing of GPU samples: a window counts as covered when
    its first sample is no later than one step after the window starts.
    """
    if snap.pending:
        return Decision(Action.KEEP, f"pending-{snap.pending}")
    if not snap.ready:
        return Decision(Action.KEEP, "not-ready")
    if snap.name == "" and not cfg.cull_default_servers:
        return Decision(Action.KEEP, "default-servers-excluded")
    if snap.name != "" and not cfg.cull_named_servers:
        return Decision(Action.KEEP, "named-servers-excluded")

    prof = cfg.for_profile(snap.profile)

    # ---- missing / inconsistent data: skip, never cull ----------------------
    if snap.last_activity is None:
        return Decision(Action.SKIP, "missing-last-activity", gpus=prof.gpus)
    if snap.started is None:
        return Decision(Action.SKIP, "missing-started", gpus=prof.gpus)
    if snap.last_activity > now + CLOCK_SKEW or snap.started > now + CLOCK_SKEW:
        return Decision(Action.SKIP, "timestamps-in-future", gpus=prof.gpus)
    kernels: tuple[Kernel, ...] = ()
    if cfg.use_kernels:
        if snap.kernels is None:
            return Decision(
                Action.SKIP, "kernels-unavailable", gpus=prof.gpus, detail=snap.kernels_error
            )
        kernels = snap.kernels
        for k in kernels:
            if k.execution_state not in BUSY_STATES | IDLE_STATES:
                return Decision(
                    Action.SKIP, "kernel-state-unknown", gpus=prof.gpus,
                    detail=f"kernel {k.id}: {k.execution_state!r}",
                )
            if k.last_activity is None:
                return Decision(Action.SKIP, "kernel-missing-last-activity", gpus=prof.gpus)
            if k.last_activity > now + CLOCK_SKEW:
                return Decision(Action.SKIP, "timestamps-in-future", gpus=prof.gpus)
    gpu_last_active: datetime | None = None
    gpu_all_idle = False
    window_start = now - timedelta(seconds=cfg.gpu_idle_window)
    if prof.gpus:
        if snap.gpu is None or not snap.gpu.ok:
            return Decision(
                Action.SKIP, "gpu-data-unavailable", gpus=prof.gpus,
                detail=snap.gpu.error if snap.gpu else "no GPU source",
            )
        gpu_last_active, gpu_all_idle = _gpu_summary(
            snap.gpu, window_start, cfg.gpu_idle_threshold, gpu_step
        )
        if gpu_last_active is not None and gpu_last_active > now + CLOCK_SKEW:
            return Decision(Action.SKIP, "timestamps-in-future", gpus=prof.gpus)

    # ---- activity -----------------------------------------------------------
    busy = [k for k in kernels if k.execution_state in BUSY_STATES]
    idle_marks = [k.last_activity for k in kernels if k.execution_state not in BUSY_STATES]
    gpu_idle_rule = False
    if busy:
        forgotten = (
            prof.gpus > 0
            and gpu_all_idle
            and all(k.busy_since is not None and k.busy_since <= window_start for k in busy)
            and snap.unattended_since is not None
            and snap.unattended_since <= window_start
        )
        if not forgotten:
            return Decision(Action.KEEP, "kernel-busy", idle_since=now, gpus=prof.gpus)
        gpu_idle_rule = True
        marks = [k.busy_since for k in busy] + [snap.unattended_since] + idle_marks
    else:
        marks = [snap.last_activity] + idle_marks
    if gpu_last_active is not None:
        marks.append(gpu_last_active)
    idle_since = max(m for m in marks if m is not None)
    idle_for = (now - idle_since).total_seconds()
    age = (now - snap.started).total_seconds()

    reason = ""
    if idle_for >= prof.idle_timeout:
        reason = "gpu-idle" if gpu_idle_rule else "idle"
    elif prof.max_age and age >= prof.max_age:
        reason = "max-age"

    if not reason:
        if grace is not None:
            return Decision(Action.KEEP, "activity-during-grace", idle_since=idle_since, gpus=prof.gpus)
        return Decision(Action.KEEP, "active", idle_since=idle_since, gpus=prof.gpus)

    # ---- warning and grace period -----------------------------------------
    if cfg.grace_period <= 0:
        return Decision(Action.CULL, reason, idle_since=idle_since, gpus=prof.gpus)
    if grace is None:
        return Decision(
            Action.WARN, reason, idle_since=idle_since, gpus=prof.gpus,
            grace=GraceState(warned_at=now, idle_since=idle_since, reason=reason),
        )
    if reason != "max-age" and idle_since > grace.idle_since:
        return Decision(Action.KEEP, "activity-during-grace", idle_since=idle_since, gpus=prof.gpus)
    if (now - grace.warned_at).total_seconds() >= cfg.grace_period:
        return Decision(Action.CULL, reason, idle_since=idle_since, gpus=prof.gpus)
    return Decision(Action.GRACE, reason, idle_since=idle_since, grace=grace, gpus=prof.gpus)


def reconfirm(planned: Decision, fresh: Decision) -> tuple[bool, str]:
    """Whether a warning or stop decided on the pass's snapshot still stands.

    A pass reads every server first and acts afterwards, so a user who came
    back in between would be culled on stale data. Just before acting the
    culler re-reads that one server and runs :func:`decide` again; only the
    same action on the fresh snapshot goes ahead. Anything else — activity
    (``active``, ``kernel-busy``, ``activity-during-grace``), the server gone,
    or missing data on the re-read (a ``SKIP``) — cancels it. Returns
    ``(go_ahead, why_not)``; ``why_not`` is the fresh decision's reason.
    """
    if fresh.action == planned.action:
        return True, ""
    return False, fresh.reason or fresh.action.value
