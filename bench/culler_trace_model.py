"""The synthetic week of GPU-server sessions bench/culler_trace.py replays.

Why a module of its own: the trace is pure (seeded, no I/O), so the replay and
its report read the same intents without the hub machinery around them. Per
user it holds one intent per trace minute (see culler_trace's docstring for
the mix of work blocks, lunch and end-of-day outcomes) and the minutes with an
interaction, and the GPU source that answers from it in the culler's process.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone

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
    """hubml GpuSource answering from the trace itself (what DCGM would show).

    Runs in the culler's process: the utilisation of ``jupyter-userNN`` at a
    real time is that of the user's trace intent at that trace minute (a
    stopped server is never asked about; a restarted one starts in a block).
    """

    def __init__(self, intents: list[list[str]], t0: float, sph: float) -> None:
        self.intents = intents
        self.t0 = t0
        self.sph = sph
        self.step = 60 * sph / 3600
        self.requests = 0

    def util_at(self, u: int, t: float) -> float | None:
        m = int((t - self.t0) / self.sph * 60)
        if m < 0 or m >= WEEK_MIN:
            return None
        return gpu_util(self.intents[u][m])

    async def utilisation(self, pods, window, now, *, lookback=0.0, threshold=0.0):
        from hubml.culler.policy import GpuReading

        self.requests += 1
        out = {}
        end = now.timestamp()
        for ref in pods:
            u = int(ref.pod.rsplit("user", 1)[1])
            samples = []
            t = end - window
            while t <= end + 1e-9:
                v = self.util_at(u, t)
                if v is not None:
                    samples.append((datetime.fromtimestamp(t, timezone.utc), v))
                t += self.step
            last_busy = None  # the last step above the threshold over the look-back, as Prometheus answers
            t = end
            while last_busy is None and t >= end - lookback - 1e-9:
                v = self.util_at(u, t)
                if v is not None and v > threshold:
                    last_busy = datetime.fromtimestamp(t, timezone.utc)
                t -= self.step
            out[ref] = GpuReading(ok=True, samples=tuple(samples), last_busy=last_busy)
        return out
