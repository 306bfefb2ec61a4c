"""The control plane's OS processes: liveness of a pid, log tails and stopping
them in reverse start order without signalling a pid that was reused."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_processes(
    pids: Mapping[str, int], binaries: Mapping[str, str], procs: Mapping[str, subprocess.Popen], timeout: float
) -> None:
    """SIGTERM in reverse start order, SIGKILL what is left after `timeout`; only
    signals a pid whose command line still names the binary we started."""
    order = ["kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]
    names = sorted(pids, key=lambda n: order.index(n) if n in order else -1)
    for name in names:
        pid = pids[name]
        binary = binaries.get(name, name)
        if not pid_alive(pid) or binary not in cmdline(pid):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = procs.get(name)
            if proc is not None:
                if proc.poll() is not None:
                    break
            elif not pid_alive(pid):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if name in procs:
                procs[name].wait(5)
    for proc in procs.values():  # reap
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
