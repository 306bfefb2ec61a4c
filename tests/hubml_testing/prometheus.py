"""pytest plugin: start Debian's real Prometheus scraping the given targets.

Usage (registered as ``hubml_testing.prometheus``)::

    def test_metrics(prometheus_factory):
        prom = prometheus_factory(["127.0.0.1:9400"], scrape_interval="1s")
        prom.wait_for("DCGM_FI_DEV_GPU_UTIL", timeout=30)
        result = prom.query("up")

The binary is ``/usr/bin/prometheus`` from ``apt-get install -y prometheus``;
when it is missing the test FAILS with that instruction (the suite never skips).
Each instance gets a temp config + TSDB directory and a free port, scrapes every
``scrape_interval`` (default 1 s) and is stopped at teardown. ``labels`` become
extra target labels (e.g. ``{"namespace": "hubml"}``), and
``honor_labels`` keeps the exporter's own ``pod``/``namespace`` labels as the
DCGM exporter's do in Kubernetes.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hubml_testing.ports import free_port, wait_http

PROMETHEUS_BIN = "/usr/bin/prometheus"


@dataclass
class RunningPrometheus:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    workdir: Path
    log_path: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns the ``data.result`` vector."""
        qs = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise AssertionError(f"prometheus query {promql!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(self, promql: str, *, timeout: float = 60, min_results: int = 1) -> list:
        """Wait until ``promql`` returns at least ``min_results`` series."""
        deadline = time.monotonic() + timeout
        result: list = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if len(result) >= min_results:
                return result
            time.sleep(0.2)
        raise AssertionError(
            f"prometheus: {promql!r} returned {len(result)} series after {timeout}s "
            f"(wanted {min_results}). Log:\n{self.log_tail()}"
        )

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_prometheus(
    tmp_root: Path,
    targets: list[str],
    *,
    scrape_interval: str = "1s",
    labels: dict[str, str] | None = None,
    honor_labels: bool = True,
    timeout: float = 60,
) -> RunningPrometheus:
    if not shutil.which(PROMETHEUS_BIN):
        pytest.fail(
            f"{PROMETHEUS_BIN} not found: the Prometheus fixture runs Debian's real "
            "server. Install it with `apt-get update && apt-get install -y prometheus` "
            "and re-run the tests.",
            pytrace=False,
        )
    workdir = Path(tempfile.mkdtemp(prefix="prom-", dir=tmp_root))
    port = free_port()
    static: dict[str, Any] = {"targets": list(targets)}
    if labels:
        static["labels"] = dict(labels)
    cfg = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": "hubml-test",
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "honor_labels": honor_labels,
                "static_configs": [static],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS_BIN,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--web.enable-lifecycle",
            ],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = RunningPrometheus(f"http://127.0.0.1:{port}", proc, workdir, log_path)
    if not wait_http(
        prom.url + "/-/ready",
        timeout=timeout,
        alive=lambda: proc.poll() is None,
        accept=lambda c: c == 200,
    ):
        tail = prom.log_tail()
        prom.stop()
        pytest.fail(f"prometheus did not become ready on {prom.url}:\n{tail}", pytrace=False)
    return prom


@pytest.fixture
def prometheus_factory(tmp_path_factory):
    """Factory fixture: ``prometheus_factory(targets, scrape_interval="1s", labels=None)``."""
    started: list[RunningPrometheus] = []
    root = tmp_path_factory.mktemp("prometheus")

    def factory(targets: list[str], **kwargs) -> RunningPrometheus:
        prom = start_prometheus(root, targets, **kwargs)
        started.append(prom)
        return prom

    yield factory
    for prom in started:
        prom.stop()
