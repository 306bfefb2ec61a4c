"""GPU utilisation sources.

A source answers one question per pass: for these pods, what was the GPU
utilisation over the last window? :class:`PrometheusGpuSource` asks Prometheus
for the DCGM exporter's ``DCGM_FI_DEV_GPU_UTIL`` (percent, one series per GPU);
other sources (a vendor API, a trace in the benchmark) implement
:class:`GpuSource`.
"""

from __future__ import annotations

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
        self, pods: Iterable[PodRef], window: float, now: datetime
    ) -> dict[PodRef, GpuReading]:
        """Readings for ``pods`` over ``[now - window, now]``; one per pod asked."""


class PrometheusGpuSource:
    """Reads ``DCGM_FI_DEV_GPU_UTIL`` through the Prometheus HTTP API.

    One ``query_range`` per pass covers every pod of the namespace(s); a pod is
    matched by the ``pod`` or ``exported_pod`` label (the latter when Prometheus
    scrapes the exporter without ``honor_labels``) and the ``namespace`` /
    ``exported_namespace`` label. With several GPUs in one pod the busiest GPU
    counts at each step. Any error (Prometheus down, bad answer) marks every pod
    unknown, so no GPU server is culled on it.
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

    async def utilisation(
        self, pods: Iterable[PodRef], window: float, now: datetime
    ) -> dict[PodRef, GpuReading]:
        wanted = set(pods)
        if not wanted:
            return {}
        start = now - timedelta(seconds=window)
        params = {
            "query": self._selector({p.namespace for p in wanted}),
            "start": f"{start.timestamp():.3f}",
            "end": f"{now.timestamp():.3f}",
            "step": f"{self.step:g}",
        }
        req = HTTPRequest(
            f"{self.url}/api/v1/query_range?{urlencode(params)}",
            headers=self.headers,
            request_timeout=self.timeout,
            connect_timeout=self.timeout,
        )
        self.requests += 1
        try:
            resp = await self.client.fetch(req)
            body = json.loads(resp.body)
            if body.get("status") != "success":
                raise ValueError(f"status {body.get('status')!r}: {body.get('error')}")
            result = body["data"]["result"]
        except (HTTPClientError, OSError, ValueError, KeyError, TypeError) as e:
            err = f"prometheus query failed: {e}"
            return {p: GpuReading(ok=False, error=err) for p in wanted}

        per_pod: dict[PodRef, dict[float, float]] = {}
        for series in result:
            labels = series.get("metric", {})
            pod = labels.get("pod") or labels.get("exported_pod")
            ns = labels.get("namespace") or labels.get("exported_namespace")
            if labels.get("exported_pod") and labels.get("exported_namespace"):
                pod, ns = labels["exported_pod"], labels["exported_namespace"]
            ref = PodRef(ns or "", pod or "")
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
            out[ref] = GpuReading(ok=True, samples=samples)
        return out
