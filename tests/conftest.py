"""Suite-wide rules.

- A skipped or xfailed test is a failure: every component a test needs is
  installed and started by ``dev/test`` (and so by CI); a missing one must show
  up red, never as a quiet skip.
- No process may outlive the suite: after every fixture is torn down, any
  process still descending from pytest fails the run, listed by command line.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

pytest_plugins = [
    "hubml_testing.kube",
    "hubml_testing.real_node",
    "hubml_testing.jupyterhub",
    "hubml_testing.prometheus",
    "hubml_testing.kernel",
    "hubml_testing.mlflow_server",
]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if hasattr(report, "wasxfail"):
            reason = f"xfail: {report.wasxfail}"
            del report.wasxfail
        report.outcome = "failed"
        report.longrepr = f"Skipped tests fail in hubml's suite (install/start what it needs instead): {reason}"


def _descendants() -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def pytest_sessionfinish(session, exitstatus):
    deadline = time.monotonic() + 10
    left = _descendants()
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = _descendants()
    if left:
        lines = []
        for proc in left:
            try:
                lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
            except psutil.Error:
                continue
        if lines:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            msg = "Processes left behind by the test suite (a test or fixture did not stop them):\n" + "\n".join(lines)
            if reporter:
                reporter.write_line(msg, red=True)
            for proc in left:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            session.exitstatus = 1
