"""Free loopback ports and readiness polling shared by the process fixtures.

Kept apart from the fixtures themselves so the JupyterHub and Prometheus plugins
(and any helper that starts its own process) pick ports the same way.
"""

from __future__ import annotations

import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


NODE_PORTS = (30000, 32767)  # Kubernetes' default --service-node-port-range


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections and to ``bind(port 0)``."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now.

    Chosen at random *below* the kernel's ephemeral range, checked by binding it. A
    port from ``bind(port 0)`` lies inside that range, where any outgoing connection
    (a kernel client, gloo, the suite's HTTP calls) may take it between this check and
    the server's own bind: JupyterHub once failed to start that way ("Address already
    in use"). Below the range only another listener choosing the same port can, one
    chance in thousands. Kubernetes' NodePort range is avoided too: kube-proxy on the
    real node rewrites traffic to those ports on the node's address. Falls back to
    ``bind(port 0)`` if no port there is free.
    """
    top = min(_ephemeral_range()[0], NODE_PORTS[0])
    if top > 11000:
        for _ in range(100):
            port = random.randrange(10000, top)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(
    url: str,
    *,
    timeout: float,
    alive: Callable[[], bool],
    accept: Callable[[int], bool] = lambda code: code < 500,
    headers: dict[str, str] | None = None,
) -> bool:
    """Poll ``url`` until it answers with an accepted status.

    Returns False when ``alive()`` turns false (the process died) or the time
    runs out, so the caller can fail with the process log instead of a bare
    connection error.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if accept(resp.status):
                    return True
        except urllib.error.HTTPError as e:
            if accept(e.code):
                return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    return False
