"""Prometheus metrics the culler exports on ``/metrics``.

One registry per culler instance (not the process-global one) so several
cullers in one test process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class CullerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.culls = Counter(
            "hubml_culler_culls", "Servers culled, by reason and profile.",
            ["reason", "profile"], registry=self.registry,
        )
        self.gpu_hours = Counter(
            "hubml_culler_gpu_hours_reclaimed",
            "Idle GPU-hours ended by culls (GPUs x hours idle at cull time).",
            ["profile"], registry=self.registry,
        )
        self.skipped = Counter(
            "hubml_culler_skipped",
            "Servers skipped because data was missing or inconsistent, by reason.",
            ["reason"], registry=self.registry,
        )
        self.warnings = Counter(
            "hubml_culler_warnings", "Cull warnings sent, by reason.",
            ["reason"], registry=self.registry,
        )
        self.cancelled = Counter(
            "hubml_culler_warnings_cancelled", "Warnings cancelled by activity.",
            registry=self.registry,
        )
        self.aborted = Counter(
            "hubml_culler_cull_aborted",
            "Warnings (stage=warn) and stops (stage=cull) called off because the "
            "server's fresh state, re-read just before acting, no longer called "
            "for them, by the fresh decision's reason.",
            ["stage", "reason"], registry=self.registry,
        )
        self.stop_pending = Counter(
            "hubml_culler_stops_pending",
            "Stops the hub accepted but had not finished (202).",
            registry=self.registry,
        )
        self.pass_duration = Histogram(
            "hubml_culler_pass_duration_seconds", "Wall time of one cull pass.",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, float("inf")),
            registry=self.registry,
        )
        self.pass_errors = Counter(
            "hubml_culler_pass_errors", "Passes whose user list was partial or failed.",
            registry=self.registry,
        )
        self.servers_seen = Gauge(
            "hubml_culler_servers_seen", "Ready servers seen in the last pass.",
            registry=self.registry,
        )
