"""Pure decision rules (hubml.culler.policy), one rule per test."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from hubml.culler.catalogue import CatalogueError, parse_profiles
from hubml.culler.policy import (
    Action,
    Decision,
    GpuReading,
    GraceState,
    Kernel,
    PolicyConfig,
    ProfilePolicy,
    ServerSnapshot,
    decide,
    gpu_lookback,
    reconfirm,
    track_attention,
    track_kernels,
)

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
MIN = timedelta(minutes=1)

CFG = PolicyConfig(
    default=ProfilePolicy(idle_timeout=3600),
    profiles={
        "a100": ProfilePolicy(idle_timeout=1800, gpus=1),
        "aged": ProfilePolicy(idle_timeout=3600, max_age=8 * 3600),
    },
    gpu_idle_window=1800,
    grace_period=0,
)


def snap(**kw) -> ServerSnapshot:
    base = dict(
        user="alice", name="", profile=None, ready=True, pending=None,
        started=NOW - 10 * 60 * MIN, last_activity=NOW - 90 * MIN, kernels=(),
    )
    base.update(kw)
    return ServerSnapshot(**base)


def gpu(values, start=NOW - 31 * MIN, step=60) -> GpuReading:
    return GpuReading(ok=True, samples=tuple((start + timedelta(seconds=i * step), v) for i, v in enumerate(values)))


def idle_kernel(ago):
    return Kernel("k1", "idle", NOW - ago)


def busy_kernel(since, connections=0):
    return Kernel("k1", "busy", NOW - MIN, connections=connections, busy_since=since)


def test_idle_past_default_timeout_is_culled():
    d = decide(snap(), CFG, None, NOW)
    assert (d.action, d.reason) == (Action.CULL, "idle")
    assert d.idle_since == NOW - 90 * MIN


def test_recent_hub_activity_keeps():
    d = decide(snap(last_activity=NOW - 10 * MIN), CFG, None, NOW)
    assert (d.action, d.reason) == (Action.KEEP, "active")


def test_idle_kernel_activity_counts():
    d = decide(snap(kernels=(idle_kernel(5 * MIN),)), CFG, None, NOW)
    assert d.action == Action.KEEP and d.idle_since == NOW - 5 * MIN


def test_busy_kernel_keeps_cpu_server():
    d = decide(snap(kernels=(busy_kernel(NOW - 5 * 60 * MIN),)), CFG, None, NOW)
    assert (d.action, d.reason) == (Action.KEEP, "kernel-busy")


def test_per_profile_timeout_from_user_options():
    s = snap(profile="a100", last_activity=NOW - 40 * MIN, gpu=gpu([0] * 32))
    assert decide(s, CFG, None, NOW).action == Action.CULL  # 40 min > 30 min
    assert decide(replace(s, profile=None), CFG, None, NOW).action == Action.KEEP  # 40 < 60
    assert decide(replace(s, profile="unknown"), CFG, None, NOW).action == Action.KEEP


def test_forgotten_loop_gpu_idle_busy_kernel_unattended_is_culled():
    s = snap(
        profile="a100", last_activity=NOW - MIN,  # singleuser reports kernel output
        kernels=(busy_kernel(NOW - 40 * MIN),), unattended_since=NOW - 45 * MIN,
        gpu=gpu([0] * 32),
    )
    d = decide(s, CFG, None, NOW)
    assert (d.action, d.reason) == (Action.CULL, "gpu-idle")
    assert d.idle_since == NOW - 40 * MIN
    assert d.idle_gpu_hours(NOW) == pytest.approx(40 / 60)


@pytest.mark.parametrize(
    "change, why",
    [
        (dict(gpu=gpu([0] * 20 + [35] + [0] * 11)), "GPU used in window"),
        (dict(kernels=(busy_kernel(NOW - 10 * MIN),)), "cell started in window"),
        (dict(unattended_since=NOW - 10 * MIN), "someone attached in window"),
        (dict(unattended_since=None), "someone attached now"),
        (dict(gpu=gpu([0] * 10, start=NOW - 10 * MIN)), "window not covered by samples"),
        (dict(profile=None, gpu=None), "CPU profile: busy kernel is work"),
    ],
)
def test_forgotten_loop_needs_every_condition(change, why):
    s = snap(
        profile="a100", last_activity=NOW - MIN,
        kernels=(busy_kernel(NOW - 40 * MIN),), unattended_since=NOW - 45 * MIN,
        gpu=gpu([0] * 32),
    )
    d = decide(replace(s, **change), CFG, None, NOW)
    assert d.action == Action.KEEP, why


def test_gpu_activity_keeps_server_without_kernels():
    s = snap(profile="a100", last_activity=NOW - 60 * MIN, gpu=gpu([0] * 25 + [90] * 7))
    d = decide(s, CFG, None, NOW)
    assert d.action == Action.KEEP and d.idle_since > NOW - 2 * MIN


def _replay_after_training(scale: float, kernel_state: str) -> tuple[list[tuple[datetime, Decision]], datetime]:
    """Passes every (scaled) minute over a GPU server whose training run ends at ``end``.

    The reading is what a source answers (Prometheus in the culler): samples over
    the GPU-idle window and the last busy step over :func:`gpu_lookback`. The
    server: a 1 h ``idle_timeout`` profile, started 3 h before, the user last seen
    when the run started (2 h before ``end``); the kernel idle since then (the
    run was a background job) or busy and unattended (a loop left running).
    """
    minute = timedelta(seconds=60 * scale)
    cfg = PolicyConfig(default=ProfilePolicy(idle_timeout=3600 * scale),
                       profiles={"a100-1h": ProfilePolicy(idle_timeout=3600 * scale, gpus=1)},
                       gpu_idle_window=1800 * scale, grace_period=600 * scale)
    end = NOW
    start = end - 120 * minute

    def util(t: datetime) -> float:
        return 90.0 if start <= t <= end else 0.0

    def reading(now: datetime) -> GpuReading:
        window = [now - (30 - i) * minute for i in range(31)]  # 30 min at 1 min steps
        steps = (now - i * minute for i in range(round(gpu_lookback(cfg) / (60 * scale)) + 1))
        return GpuReading(ok=True, samples=tuple((t, util(t)) for t in window),
                          last_busy=next((t for t in steps if util(t) > cfg.gpu_idle_threshold), None))

    kernel = Kernel("k1", kernel_state, start, busy_since=start if kernel_state == "busy" else None)
    server = snap(profile="a100-1h", started=start - 60 * minute, last_activity=start, kernels=(kernel,),
                  unattended_since=start)
    actions, grace = [], None
    for i in range(-5, 95):
        now = end + i * minute
        d = decide(replace(server, gpu=reading(now)), cfg, grace, now, gpu_step=60 * scale)
        grace = d.grace
        actions.append((now, d))
        if d.action == Action.CULL:
            break
    return actions, end


@pytest.mark.parametrize("kernel_state", ["idle", "busy"])
@pytest.mark.parametrize("scale", [1, 1 / 3600], ids=["minutes", "hour-per-second"])
def test_gpu_server_is_kept_for_idle_timeout_after_its_last_busy_sample(scale, kernel_state):
    """README rule 3: the last busy GPU sample is activity even once it is older than the
    GPU-idle window, so a run that ended is not culled after window + grace (40 min)."""
    decisions, end = _replay_after_training(scale, kernel_state)
    timeout, grace, minute = (timedelta(seconds=s * scale) for s in (3600, 600, 60))
    warned = [t for t, d in decisions if d.action == Action.WARN]
    assert warned, decisions
    assert all(d.action == Action.KEEP for t, d in decisions if t < warned[0])
    assert end + timeout <= warned[0] <= end + timeout + minute  # idle_timeout after the last busy sample
    culled_at, cull = decisions[-1]
    assert cull.action == Action.CULL and warned[0] + grace <= culled_at <= warned[0] + grace + minute
    assert abs(cull.idle_since - end) <= minute  # idle since the run's end, not since the user left


def test_gpu_lookback_covers_the_longest_gpu_idle_timeout_until_the_cull():
    cfg = replace(CFG, profiles={**CFG.profiles, "h100": ProfilePolicy(idle_timeout=4 * 3600, gpus=8)},
                  grace_period=600)
    # CPU profiles' timeouts do not count (aged, default: 1 h); + grace + one window
    assert gpu_lookback(cfg) == 4 * 3600 + 600 + 1800
    assert gpu_lookback(CFG) == 1800 + 1800
    assert gpu_lookback(replace(CFG, profiles={})) == 1800  # no GPU profile: the window


def test_busy_sample_before_the_window_counts_as_activity_not_as_use_in_the_window():
    busy_before = replace(gpu([0] * 32), last_busy=NOW - 50 * MIN)
    s = snap(profile="a100", last_activity=NOW - 90 * MIN, gpu=busy_before)
    d = decide(s, CFG, None, NOW)
    assert (d.action, d.reason, d.idle_since) == (Action.CULL, "idle", NOW - 50 * MIN)  # 50 min > 30 min
    d = decide(replace(s, gpu=replace(busy_before, last_busy=NOW - 20 * MIN)), CFG, None, NOW)
    assert (d.action, d.idle_since) == (Action.KEEP, NOW - 20 * MIN)
    # the forgotten loop still needs the window idle: a busy sample inside it is use
    loop = snap(profile="a100", last_activity=NOW - MIN, kernels=(busy_kernel(NOW - 40 * MIN),),
                unattended_since=NOW - 45 * MIN)
    assert decide(replace(loop, gpu=replace(busy_before, last_busy=NOW - 10 * MIN)), CFG, None, NOW).reason \
        == "kernel-busy"
    assert decide(replace(loop, gpu=replace(busy_before, last_busy=NOW + 5 * MIN)), CFG, None, NOW).reason \
        == "timestamps-in-future"


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(last_activity=None), "missing-last-activity"),
        (dict(started=None), "missing-started"),
        (dict(last_activity=NOW + 10 * MIN), "timestamps-in-future"),
        (dict(kernels=None, kernels_error="503"), "kernels-unavailable"),
        (dict(kernels=(Kernel("k", "idle", None),)), "kernel-missing-last-activity"),
        (dict(kernels=(Kernel("k", "weird", NOW - 90 * MIN),)), "kernel-state-unknown"),
        (dict(profile="a100", gpu=GpuReading(ok=False, error="down")), "gpu-data-unavailable"),
        (dict(profile="a100", gpu=None), "gpu-data-unavailable"),
    ],
)
def test_missing_or_inconsistent_data_is_skipped_never_culled(change, reason):
    d = decide(snap(**change), CFG, None, NOW)
    assert (d.action, d.reason) == (Action.SKIP, reason)


def test_pending_and_not_ready_are_kept():
    assert decide(snap(pending="spawn"), CFG, None, NOW).action == Action.KEEP
    assert decide(snap(ready=False), CFG, None, NOW).action == Action.KEEP


def test_default_and_named_server_switches():
    cfg = replace(CFG, cull_default_servers=False)
    assert decide(snap(), cfg, None, NOW).reason == "default-servers-excluded"
    assert decide(snap(name="big"), cfg, None, NOW).action == Action.CULL
    cfg = replace(CFG, cull_named_servers=False)
    assert decide(snap(name="big"), cfg, None, NOW).reason == "named-servers-excluded"


def test_max_age_culls_active_server_but_not_busy_kernel():
    s = snap(profile="aged", last_activity=NOW - MIN, started=NOW - 9 * 60 * MIN)
    assert decide(s, CFG, None, NOW).reason == "max-age"
    busy = replace(s, kernels=(busy_kernel(NOW - MIN),))
    assert decide(busy, CFG, None, NOW).action == Action.KEEP


def test_grace_period_warn_then_cull():
    cfg = replace(CFG, grace_period=600)
    d1 = decide(snap(), cfg, None, NOW)
    assert d1.action == Action.WARN and d1.grace.warned_at == NOW
    d2 = decide(snap(), cfg, d1.grace, NOW + 5 * MIN)
    assert d2.action == Action.GRACE and d2.grace == d1.grace
    d3 = decide(snap(), cfg, d1.grace, NOW + 10 * MIN)
    assert (d3.action, d3.reason) == (Action.CULL, "idle")


def test_activity_during_grace_cancels():
    cfg = replace(CFG, grace_period=600)
    d1 = decide(snap(), cfg, None, NOW)
    later = snap(last_activity=NOW + 2 * MIN)
    d2 = decide(later, cfg, d1.grace, NOW + 11 * MIN)
    assert (d2.action, d2.reason) == (Action.KEEP, "activity-during-grace")
    assert d2.grace is None
    # activity that still leaves the server over its timeout also cancels
    long_cfg = replace(cfg, default=ProfilePolicy(idle_timeout=60))
    g = GraceState(NOW, NOW - 90 * MIN, "idle")
    d3 = decide(snap(last_activity=NOW - 80 * MIN), long_cfg, g, NOW + 11 * MIN)
    assert d3.reason == "activity-during-grace"


def test_max_age_is_not_cancelled_by_activity():
    cfg = replace(CFG, grace_period=600)
    s = snap(profile="aged", last_activity=NOW - MIN, started=NOW - 9 * 60 * MIN)
    d1 = decide(s, cfg, None, NOW)
    assert d1.action == Action.WARN
    d2 = decide(replace(s, last_activity=NOW + 5 * MIN), cfg, d1.grace, NOW + 10 * MIN)
    assert (d2.action, d2.reason) == (Action.CULL, "max-age")


def test_recheck_calls_off_a_cull_when_the_user_came_back():
    """The pass decided on a snapshot from before the user's return; the
    re-read just before the stop sees the new activity and cancels."""
    stale = snap(last_activity=NOW - 90 * MIN)
    planned = decide(stale, CFG, None, NOW)
    assert planned.action == Action.CULL
    later = NOW + 2 * MIN
    fresh = decide(replace(stale, last_activity=NOW + MIN), CFG, None, later)
    assert reconfirm(planned, fresh) == (False, "active")
    # an idle kernel touched by the returning user counts the same way
    by_kernel = decide(replace(stale, kernels=(Kernel("k1", "idle", NOW + MIN),)), CFG, None, later)
    assert reconfirm(planned, by_kernel) == (False, "active")
    # a cell started meanwhile
    busy = decide(replace(stale, kernels=(busy_kernel(NOW + MIN),)), CFG, None, later)
    assert reconfirm(planned, busy) == (False, "kernel-busy")
    # missing data on the re-read is never a cull
    gone = decide(replace(stale, last_activity=None), CFG, None, later)
    assert reconfirm(planned, gone) == (False, "missing-last-activity")
    # still idle: the stop goes ahead
    still = decide(stale, CFG, None, later)
    assert reconfirm(planned, still) == (True, "")


def test_recheck_after_grace_sees_activity_since_the_pass():
    cfg = replace(CFG, grace_period=600)
    warned = GraceState(warned_at=NOW - 11 * MIN, idle_since=NOW - 100 * MIN, reason="idle")
    stale = snap(last_activity=NOW - 100 * MIN)
    planned = decide(stale, cfg, warned, NOW)
    assert planned.action == Action.CULL
    fresh = decide(replace(stale, last_activity=NOW + MIN), cfg, warned, NOW + 2 * MIN)
    assert reconfirm(planned, fresh) == (False, "activity-during-grace")
    # and a warning decided on stale data is not sent either
    warn = decide(stale, cfg, None, NOW)
    assert warn.action == Action.WARN
    assert reconfirm(warn, decide(replace(stale, last_activity=NOW + MIN), cfg, None, NOW + 2 * MIN)) == (
        False, "active",
    )
    assert reconfirm(warn, decide(stale, cfg, None, NOW + 2 * MIN))[0]


def test_track_kernels_keeps_busy_runs_and_resets_on_idle():
    k_busy = Kernel("a", "busy", NOW)
    tracked, runs = track_kernels({}, [k_busy], NOW)
    assert tracked[0].busy_since == NOW and runs == {"a": NOW}
    tracked, runs = track_kernels(runs, [k_busy], NOW + 5 * MIN)
    assert tracked[0].busy_since == NOW
    tracked, runs = track_kernels(runs, [Kernel("a", "idle", NOW)], NOW + 6 * MIN)
    assert tracked[0].busy_since is None and runs == {}


def test_track_attention():
    assert track_attention(None, [Kernel("a", "busy", NOW, connections=0)], NOW) == NOW
    assert track_attention(NOW - MIN, [Kernel("a", "busy", NOW)], NOW) == NOW - MIN
    assert track_attention(NOW - MIN, [Kernel("a", "busy", NOW, connections=2)], NOW) is None


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "must be a mapping"),
        ({"a100": 5}, "must be a mapping"),
        ({"a100": {"idle": "30m"}}, "unknown keys"),
        ({"a100": {"idle_timeout": "soon"}}, "not a duration"),
        ({"a100": {"idle_timeout": 0}}, "idle_timeout 0 is not a duration here: it must be finite and positive"),
        ({"a100": {"idle_timeout": "30m", "gpu": -1}}, "'gpu' must be"),
        ({"": {"idle_timeout": "30m"}}, "non-empty"),
    ],
)
def test_profile_catalogue_rejects(data, match):
    with pytest.raises(CatalogueError, match=match):
        parse_profiles(data, ProfilePolicy(3600), "test")


def test_profile_catalogue_parses():
    out = parse_profiles(
        {"a100": {"idle_timeout": "30m", "max_age": "8h", "gpu": 2}, "cpu": {}}, ProfilePolicy(3600), "t"
    )
    assert out["a100"] == ProfilePolicy(1800, 28800, 2)
    assert out["cpu"] == ProfilePolicy(3600, 0, 0)
