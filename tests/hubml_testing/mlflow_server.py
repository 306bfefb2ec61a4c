"""A real MLflow tracking server for tests: ``mlflow server`` on sqlite + a local artifact dir.

Loaded suite-wide from ``tests/conftest.py``. Anything that talks to MLflow over
HTTP (the hub service, the local backend with ``MLFLOW_TRACKING_URI=http://...``,
model servers resolving ``models:/`` URIs) uses this instead of a fake.

Fixtures
--------
``mlflow_server`` (session scope)
    Starts ``python -m mlflow server`` once per test session on a free loopback
    port, with its backend store in ``<tmp>/mlflow.db`` (sqlite) and artifacts
    proxied by the server itself (``--serve-artifacts --artifacts-destination
    <tmp>/artifacts``), so clients need no access to the directory: every run
    and model goes through HTTP, as in a deployment. Yields ``MlflowServer``:

    - ``url`` / ``tracking_uri``: ``http://127.0.0.1:PORT`` (set it as
      ``MLFLOW_TRACKING_URI``);
    - ``backend_store_uri``: the sqlite URI (to inspect the store directly);
    - ``artifacts_dir``: where artifacts land on disk;
    - ``log_path``: the server's combined stdout/stderr, shown when it fails;
    - ``pid``: the server process (its workers are its children).

    Tests share the server, so they must use unique experiment and model names
    (e.g. ``f"exp-{uuid4().hex[:8]}"``). The server and all of its workers are
    stopped at the end of the session (process group SIGTERM, then SIGKILL).

``mlflow_server_env`` (function scope)
    ``{"MLFLOW_TRACKING_URI": url}`` for ``kernel_factory(extra_env=...)`` or
    ``subprocess`` calls.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from hubml_testing.ports import free_port, wait_http

START_TIMEOUT = 120.0


@dataclass(frozen=True)
class MlflowServer:
    url: str
    backend_store_uri: str
    artifacts_dir: Path
    log_path: Path
    pid: int

    @property
    def tracking_uri(self) -> str:
        return self.url


def _stop(proc: subprocess.Popen) -> None:
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    _, left = psutil.wait_procs(tree, timeout=10)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def start_mlflow_server(root: Path, retries: int = 3, host: str = "127.0.0.1") -> tuple[MlflowServer, subprocess.Popen]:
    """Start a server under ``root``; retried on a fresh port if another process won the port race.

    ``host``: the address it listens on and its URL names (the real node's pods reach the
    host at its bridge address, not at loopback)."""
    db = root / "mlflow.db"
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = root / "server.log"
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    env.pop("MLFLOW_TRACKING_URI", None)
    for _ in range(retries):
        port = free_port(host)
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{db}",
               "--serve-artifacts", "--artifacts-destination", str(artifacts),
               "--host", host, "--port", str(port), "--workers", "1"]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=str(root), start_new_session=True)
        url = f"http://{host}:{port}"
        if wait_http(f"{url}/health", timeout=START_TIMEOUT, alive=lambda: proc.poll() is None,
                     accept=lambda code: code == 200):
            return MlflowServer(url=url, backend_store_uri=f"sqlite:///{db}", artifacts_dir=artifacts,
                                log_path=log_path, pid=proc.pid), proc
        _stop(proc)
        if "address already in use" not in log_path.read_text(errors="replace").lower():
            break
    raise RuntimeError("mlflow server did not start; its log:\n" + log_path.read_text(errors="replace")[-4000:])


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[MlflowServer]:
    root = Path(tempfile.mkdtemp(prefix="hubml-mlflow-server-"))
    server, proc = start_mlflow_server(root)
    try:
        yield server
    finally:
        _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mlflow_server_env(mlflow_server: MlflowServer) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": mlflow_server.url}
