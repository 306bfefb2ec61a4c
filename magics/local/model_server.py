"""One local model server process: ``mlflow models serve`` started, found again, stopped.

The server runs in its own session (process group) so that it outlives the
kernel that started it and can be stopped as a whole tree. It is identified by
pid *and* start time, because after a kernel restart (or a reboot) the pid alone
may belong to an unrelated process by then.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

HOST = "127.0.0.1"

#: Popen objects of servers this process started, so that a dead one is reaped
#: (no zombie) and ``poll`` answers at once.
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class ServerProcess:
    pid: int
    create_time: float  # seconds since boot (started_at), not an epoch time
    port: int
    log_path: str

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def port_free(port: int) -> bool:
    """True when nothing listens on ``port``: bind-test it the way uvicorn binds (SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port(avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A port the OS hands out as free right now, not one a recorded deployment holds.

    The gap between this check and the server's own bind is closed by the
    caller: a server that fails with "address already in use" is retried on a
    fresh port (see ``address_in_use``).
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise OSError("no free port found on 127.0.0.1 after 50 tries")


def serve_command(model_uri: str, port: int) -> list[str]:
    """The maintained server, exactly as one would type it (see ``bench/deploy_vs_mlflow_serve.py``)."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", HOST, "--port", str(port)]


def server_env(tracking_uri: str, home: Path) -> dict[str, str]:
    """The server's environment: this one, the tracking store, and this Python's ``bin`` first on PATH.

    ``mlflow models serve`` execs ``uvicorn`` by name through bash, so a kernel
    started from a virtualenv without activating it would otherwise fail with
    "uvicorn: not found". ``HUBML_HOME`` marks the process as belonging to that
    home (the test suite finds leftovers by it).
    """
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri,
            "HUBML_HOME": str(home), "PATH": bindir + (os.pathsep + path if path else "")}


def start(model_uri: str, port: int, log_path: Path, env: dict[str, str]) -> ServerProcess:
    """Start the server detached (own session, stdin closed, output to ``log_path``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            serve_command(model_uri, port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=str(log_path.parent), start_new_session=True,
        )
    try:
        _CHILDREN[proc.pid] = proc
        created = started_at(psutil.Process(proc.pid))
    except BaseException:
        # Interrupted (or the process vanished) before the caller could record it:
        # nobody else knows this pid, so end its whole session here.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return ServerProcess(pid=proc.pid, create_time=created, port=port, log_path=str(log_path))


def started_at(proc: psutil.Process) -> float:
    """When ``proc`` started, in seconds since boot: with ``pid``, what identifies the process.

    Not ``create_time()``'s epoch value: psutil adds the kernel's ``btime``,
    which moves whenever the wall clock is adjusted, so the same process
    could read a second apart and look like another (it did, once in a long
    CI run: the server was taken for dead, and so never stopped).
    """
    return proc.create_time() - psutil.boot_time()  # both carry the same btime: it cancels out


def alive(server: ServerProcess) -> bool:
    """True while the recorded process (same pid, same start time) still runs."""
    child = _CHILDREN.get(server.pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        proc = psutil.Process(server.pid)
        return abs(started_at(proc) - server.create_time) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(server: ServerProcess, grace: float = 10.0) -> None:
    """Stop the whole tree: SIGTERM the process group (uvicorn drains in-flight requests), then SIGKILL."""
    procs: list[psutil.Process] = []
    if alive(server):
        try:
            top = psutil.Process(server.pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            procs = []
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, left = psutil.wait_procs(procs, timeout=grace)
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
    child = _CHILDREN.pop(server.pid, None)
    if child is not None:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def ping(server_url: str, timeout: float = 1.0) -> bool:
    """MLflow's scoring server answers ``GET /ping`` with 200 once the model is loaded."""
    try:
        with urllib.request.urlopen(f"{server_url}/ping", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_ready(server: ServerProcess, timeout: float, interval: float = 0.05,
               cancelled: Callable[[], bool] = lambda: False) -> str:
    """Poll until the server answers: ``"ready"``, ``"exited"`` or ``"timeout"``.

    A short interval matters: the time to first prediction is what a user waits
    for, and a poll costs well under a millisecond on loopback.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cancelled():
        if ping(server.base_url, timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
            return "ready"
        if not alive(server):
            return "exited"
        time.sleep(interval)
    return "timeout"


def log_tail(path: str | Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def address_in_use(path: str | Path) -> bool:
    """Did the server die because another process took its port first (the bind race)?"""
    tail = log_tail(path, 40).lower()
    return "address already in use" in tail or "errno 98" in tail


def post_json(url: str, body: dict, timeout: float) -> tuple[int, object]:
    """POST JSON and return (status, decoded body); HTTP errors are returned, not raised."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw.decode() or "null")
    except ValueError:
        return status, raw.decode(errors="replace")
