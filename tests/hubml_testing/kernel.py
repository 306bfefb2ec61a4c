"""A real IPython kernel for testing the magics, cell by cell.

The magics are only meaningful inside a kernel: ``UsageError`` rendering,
``_render_traceback_``, display/update of widgets, Ctrl-C (SIGINT to the
kernel's process group, exactly what Jupyter's "interrupt" button sends) and
kernel restarts all behave differently in a plain function call. So tests drive
a real ``ipykernel`` through ``jupyter_client``, the same way JupyterLab and
nbclient do; nothing is mocked.

Fixtures (loaded suite-wide from ``tests/conftest.py``):

``hubml_home`` (function scope)
    A fresh temporary directory used as ``HUBML_HOME``; ``hubml_home / "mlflow.db"``
    is the sqlite MLflow store (``MLFLOW_TRACKING_URI=sqlite:///...``), and
    the kernel's working directory is ``hubml_home / "cwd"`` (so MLflow's
    default ``./mlruns`` artifact root lands inside the temp dir too).

``kernel_factory`` (function scope)
    ``kernel_factory(home=None, load_ext=True, extra_env=None) -> KernelSession``
    starts another kernel (e.g. two kernels sharing one ``home``). Every kernel
    it started is shut down at teardown.

``hubml_kernel`` (function scope)
    A started ``KernelSession`` on ``hubml_home`` with ``%load_ext hubml``
    already run.

``KernelSession`` API (all blocking, every call has a ``timeout``):

``run(code, timeout=120, interrupt_when=None) -> CellResult``
    Execute one cell and collect everything it produced. ``interrupt_when``
    is a predicate called with the ``CellResult`` collected so far after each
    iopub message (and every 0.2 s); the first time it returns True the
    kernel is interrupted once (``KernelManager.interrupt_kernel``).
``run_ok(code, ...)``
    ``run`` + assert the cell raised nothing; returns the result.
``interrupt()``, ``restart()`` (same env, same cwd; runs ``%load_ext hubml``
    again when the session was started with it), ``shutdown()``,
    ``is_alive()``, ``pid`` (the kernel process id).

``CellResult`` fields:
``stdout``, ``stderr`` (stream text, concatenated), ``text`` (stdout +
stderr + ``text/plain`` of every display/result, in arrival order),
``outputs`` (raw iopub message contents: ``{"msg_type": ..., **content}``),
``displays`` (display_data/update_display_data contents), ``result`` (the
``text/plain`` of execute_result or None), ``status`` ("ok"/"error"/"aborted"),
``ename``/``evalue``/``traceback`` (of the error; ``traceback`` is the list
of lines IPython sent, ANSI escapes removed), ``payload`` (the execute
reply's payloads: ``%%magic?`` help arrives there as ``{"source": "page",
"data": {"text/plain": ...}}``). ``error_text`` joins
``ename: evalue`` and the traceback lines, which is what a user sees.
A ``UsageError`` arrives as ``ename == "UsageError"`` with a one-line
traceback; exceptions with ``_render_traceback_`` arrive with exactly the
lines that method returned.

Leftover processes: ``processes_with_home(home)`` lists every live process
whose environment has ``HUBML_HOME=home`` (workers, supervisors, model
servers started on behalf of that kernel, even after they were re-parented
away from pytest). The ``hubml_home`` fixture checks this at teardown: any
such process is killed and the test errors, naming its command line. So a
test that starts something with ``--no-wait`` must cancel it or wait for it.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass
class CellResult:
    status: str = "pending"
    stdout: str = ""
    stderr: str = ""
    text: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    displays: list[dict[str, Any]] = field(default_factory=list)
    result: str | None = None
    ename: str | None = None
    evalue: str | None = None
    traceback: list[str] = field(default_factory=list)
    payload: list[dict[str, Any]] = field(default_factory=list)

    @property
    def error_text(self) -> str:
        if self.ename is None:
            return ""
        return "\n".join([f"{self.ename}: {self.evalue}", *self.traceback])

    def __repr__(self) -> str:  # what pytest shows when an assert on a result fails
        return (f"CellResult(status={self.status!r}, ename={self.ename!r}, evalue={self.evalue!r})\n"
                f"--- text ---\n{self.text}\n--- traceback ---\n" + "\n".join(self.traceback))


class KernelSession:
    """One ipykernel process driven through a blocking jupyter_client."""

    def __init__(self, home: Path, load_ext: bool = True, extra_env: dict[str, str] | None = None) -> None:
        from jupyter_client.manager import KernelManager

        self.home = Path(home)
        self.cwd = self.home / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.load_ext = load_ext
        env = dict(os.environ)
        env.update(kernel_env(self.home))
        env.update(extra_env or {})
        self.env = env
        self.km = KernelManager(kernel_name="python3")
        # The kernelspec's argv names "python"; pin it to this interpreter so the
        # kernel sees the same virtualenv as the test.
        self.km.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        self.kc = None
        try:
            self._start()
        except BaseException:
            self.shutdown()  # a kernel that started but failed %load_ext must not outlive the test
            raise

    # -- lifecycle ---------------------------------------------------------
    def _start(self) -> None:
        self.km.start_kernel(env=self.env, cwd=str(self.cwd))
        self._connect()

    def _connect(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        if self.load_ext:
            self.run_ok("%load_ext hubml", timeout=120)

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid  # type: ignore[union-attr]

    def is_alive(self) -> bool:
        return bool(self.km.is_alive())

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def restart(self) -> None:
        """Restart the kernel process (new pid, empty namespace, same env/cwd)."""
        self.km.restart_kernel(now=False)
        self._connect()

    def shutdown(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None
        if self.km.has_kernel:
            try:
                self.km.shutdown_kernel(now=False)
            except Exception:
                self.km.shutdown_kernel(now=True)
        self.km.cleanup_resources()

    # -- execution ---------------------------------------------------------
    def run(self, code: str, timeout: float = 120,
            interrupt_when: Callable[[CellResult], bool] | None = None) -> CellResult:
        """Run one cell; return what it printed/displayed/raised."""
        assert self.kc is not None, "kernel was shut down"
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False)
        res = CellResult()
        deadline = time.monotonic() + timeout
        interrupted = False
        idle = False
        while not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                self.interrupt()
                raise TimeoutError(f"cell did not finish within {timeout}s; output so far:\n{res.text}")
            try:
                msg = self.kc.get_iopub_msg(timeout=min(0.2, left))
            except queue.Empty:
                msg = None
            if msg is not None and msg.get("parent_header", {}).get("msg_id") == msg_id:
                idle = self._collect(res, msg)
            if interrupt_when is not None and not interrupted and not idle and interrupt_when(res):
                interrupted = True
                self.interrupt()
        reply = self.kc.get_shell_msg(timeout=max(5.0, deadline - time.monotonic()))
        while reply.get("parent_header", {}).get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=max(5.0, deadline - time.monotonic()))
        res.status = reply["content"]["status"]
        res.payload = reply["content"].get("payload", [])
        if res.status == "error" and res.ename is None:
            res.ename = reply["content"].get("ename")
            res.evalue = reply["content"].get("evalue")
            res.traceback = [strip_ansi(t) for t in reply["content"].get("traceback", [])]
        return res

    def run_ok(self, code: str, timeout: float = 120) -> CellResult:
        res = self.run(code, timeout=timeout)
        assert res.status == "ok" and res.ename is None, f"cell failed:\n{code}\n{res}"
        return res

    @staticmethod
    def _collect(res: CellResult, msg: dict[str, Any]) -> bool:
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "status":
            return content.get("execution_state") == "idle"
        res.outputs.append({"msg_type": kind, **content})
        if kind == "stream":
            text = content.get("text", "")
            if content.get("name") == "stderr":
                res.stderr += text
            else:
                res.stdout += text
            res.text += text
        elif kind in ("display_data", "update_display_data", "execute_result"):
            plain = content.get("data", {}).get("text/plain", "")
            if kind == "execute_result":
                res.result = plain
            else:
                res.displays.append(content)
            if plain:
                res.text += plain + "\n"
        elif kind == "error":
            res.ename = content.get("ename")
            res.evalue = content.get("evalue")
            res.traceback = [strip_ansi(t) for t in content.get("traceback", [])]
        return False


def kernel_env(home: Path) -> dict[str, str]:
    """The variables that point a kernel (and what it starts) at ``home``."""
    return {
        "HUBML_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
    }


def processes_with_home(home: Path | str) -> list[psutil.Process]:
    """Live processes (any parent) whose environment carries ``HUBML_HOME=home``."""
    home = str(home)
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("HUBML_HOME") == home:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"  pid {proc.pid}: (gone)")
    return "\n".join(lines)


def wait_no_processes(home: Path | str, timeout: float = 15.0, exclude: set[int] | None = None) -> list[psutil.Process]:
    """Poll until no process carries ``home`` (except pids in ``exclude``); return what is left."""
    exclude = exclude or set()
    deadline = time.monotonic() + timeout
    left = [p for p in processes_with_home(home) if p.pid not in exclude]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in processes_with_home(home) if p.pid not in exclude]
    return left


@pytest.fixture
def hubml_home() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="hubml-home-"))
    try:
        yield root
        left = wait_no_processes(root, timeout=15)
        if left:
            text = describe(left)
            for proc in left:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            pytest.fail(f"processes started for HUBML_HOME={root} were left running:\n{text}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def kernel_factory(hubml_home: Path) -> Iterator[Callable[..., KernelSession]]:
    started: list[KernelSession] = []

    def start(home: Path | None = None, load_ext: bool = True,
              extra_env: dict[str, str] | None = None) -> KernelSession:
        session = KernelSession(home or hubml_home, load_ext=load_ext, extra_env=extra_env)
        started.append(session)
        return session

    yield start
    for session in started:
        session.shutdown()


@pytest.fixture
def hubml_kernel(kernel_factory: Callable[..., KernelSession]) -> KernelSession:
    return kernel_factory()
