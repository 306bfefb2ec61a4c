"""GPU utilisation sources.

A source answers one question per pass: for these pods, what was the GPU
utilisation over the last window, and when was it last above the threshold
over a longer look-back (the profiles' ``idle_timeout``)?
:class:`PrometheusGpuSource` asks Prometheus for the DCGM exporter's
``DCGM_FI_DEV_GPU_UTIL`` (percent, one series per GPU); other sources (a
vendor API, a trace in the benchmark) implement :class:`GpuSource`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Protocol
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .policy import GpuReading


@dataclass(frozen=True)
class PodRef:
    namespace: str
    pod: str


class GpuSource(Protocol):
    async def utilisation(
        self, pods: Iterable[PodRef], window: float, now: datetime, *,
        lookback: float = 0.0, threshold: float = 0.0,
    ) -> dict[PodRef, GpuReading]:
        """Readings for ``pods`` over ``[now - window, now]``; one per pod asked.

        With ``lookback``, each reading's ``last_busy`` is the last sample above
        ``threshold`` in ``[now - lookback, now]`` (None: there was none).
        """


class PrometheusGpuSource:
    """Reads ``DCGM_FI_DEV_GPU_UTIL`` through the Prometheus HTTP API.

    One ``query_range`` per pass covers every pod of the namespace(s); a pod is
    matched by the ``pod`` or ``exported_pod`` label (the latter when Prometheus
    scrapes the exporter without ``honor_labels``) and the ``namespace`` /
    ``exported_namespace`` label. With several GPUs in one pod the busiest GPU
    counts at each step. Any error (Prometheus down, bad answer) marks every pod
    unknown, so no GPU server is culled on it.

    The last busy sample over the look-back comes from a second, instant query
    that Prometheus reduces to one timestamp per GPU (a subquery at the same
    step, so it is the last step whose sample was above the threshold): the
    culler needs no memory of its own that a restart would lose, and the
    answer stays one number per GPU however long ``idle_timeout`` is.
    """

    metric = "DCGM_FI_DEV_GPU_UTIL"

    def __init__(
        self,
        url: str,
        *,
        step: float = 60,
        timeout: float = 10,
        client: AsyncHTTPClient | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.step = step
        self.timeout = timeout
        self.client = client or AsyncHTTPClient()
        self.headers = headers or {}
        self.requests = 0

    def _selector(self, namespaces: set[str]) -> str:
        ns = "|".join(sorted(namespaces))
        # the namespace may sit in either label; 'or' keeps both forms
        return (
            f'{self.metric}{{namespace=~"{ns}"}} or '
            f'{self.metric}{{exported_namespace=~"{ns}"}}'
        )

    def _busy_query(self, namespaces: set[str], lookback: float, threshold: float) -> str:
        """The last step (over ``lookback``) at which each GPU was above ``threshold``."""
        ns = "|".join(sorted(namespaces))
        busy = " or ".join(f'{self.metric}{{{label}=~"{ns}"}} > {float(threshold)!r}'
                           for label in ("namespace", "exported_namespace"))
        return f"max_over_time(timestamp({busy})[{_ms(lookback)}:{_ms(self.step)}])"

    async def _get(self, api: str, params: dict[str, str]) -> list[dict]:
        req = HTTPRequest(
            f"{self.url}/api/v1/{api}?{urlencode(params)}",
            headers=self.headers,
            request_timeout=self.timeout,
            connect_timeout=self.timeout,
        )
        self.requests += 1
        resp = await self.client.fetch(req)
        body = json.loads(resp.body)
        if body.get("status") != "success":
            raise ValueError(f"status {body.get('status')!r}: {body.get('error')}")
        return body["data"]["result"]

    async def utilisation(
        self, pods: Iterable[PodRef], window: float, now: datetime, *,
        lookback: float = 0.0, threshold: float = 0.0,
    ) -> dict[PodRef, GpuReading]:
        wanted = set(pods)
        if not wanted:
            return {}
        namespaces = {p.namespace for p in wanted}
        start = now - timedelta(seconds=window)
        queries = [self._get("query_range", {
            "query": self._selector(namespaces),
            "start": f"{start.timestamp():.3f}",
            "end": f"{now.timestamp():.3f}",
            "step": f"{self.step:g}",
        })]
        if lookback > 0:
            queries.append(self._get("query", {
                "query": self._busy_query(namespaces, lookback, threshold),
                "time": f"{now.timestamp():.3f}",
            }))
        answers = await asyncio.gather(*queries, return_exceptions=True)
        for answer in answers:
            if isinstance(answer, (HTTPClientError, OSError, ValueError, KeyError, TypeError)):
                err = f"prometheus query failed: {answer}"
                return {p: GpuReading(ok=False, error=err) for p in wanted}
            if isinstance(answer, BaseException):
                raise answer
        result, *busy = answers

        last_busy: dict[PodRef, float] = {}
        for series in busy[0] if busy else []:
            ref = _pod_of(series.get("metric", {}))
            try:
                ts = float(series["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            if ref in wanted and math.isfinite(ts):
                last_busy[ref] = max(ts, last_busy.get(ref, ts))  # the busiest GPU of the pod
        per_pod: dict[PodRef, dict[float, float]] = {}
        for series in result:
            ref = _pod_of(series.get("metric", {}))
            if ref not in wanted:
                continue
            bucket = per_pod.setdefault(ref, {})
            for ts, value in series.get("values", []):
                try:
                    v = float(value)
                except (TypeError, ValueError):
                    continue
                if math.isnan(v):
                    continue
                bucket[float(ts)] = max(v, bucket.get(float(ts), v))
        out: dict[PodRef, GpuReading] = {}
        for ref in wanted:
            bucket = per_pod.get(ref)
            if not bucket:
                out[ref] = GpuReading(
                    ok=False, error=f"no {self.metric} series for pod {ref.namespace}/{ref.pod}"
                )
                continue
            samples = tuple(
                (datetime.fromtimestamp(ts, timezone.utc), v) for ts, v in sorted(bucket.items())
            )
            busy_at = last_busy.get(ref)
            out[ref] = GpuReading(ok=True, samples=samples, last_busy=None if busy_at is None
                                  else datetime.fromtimestamp(busy_at, timezone.utc))
        return out


def _pod_of(labels: dict[str, str]) -> PodRef:
    """The pod a DCGM series belongs to: ``exported_*`` labels when both are there
    (Prometheus scraped the exporter without ``honor_labels``), else ``pod``/``namespace``."""
    pod = labels.get("pod") or labels.get("exported_pod")
    ns = labels.get("namespace") or labels.get("exported_namespace")
    if labels.get("exported_pod") and labels.get("exported_namespace"):
        pod, ns = labels["exported_pod"], labels["exported_namespace"]
    return PodRef(ns or "", pod or "")


def _ms(seconds: float) -> str:
    """A PromQL duration (whole milliseconds; PromQL durations take no decimals)."""
    return f"{max(1, round(seconds * 1000))}ms"
