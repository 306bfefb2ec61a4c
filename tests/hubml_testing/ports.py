"""Free loopback ports and readiness polling shared by the process fixtures.

Kept apart from the fixtures themselves so the JupyterHub and Prometheus plugins
(and any helper that starts its own process) pick ports the same way.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now.

    Binding port 0 lets the kernel choose; the tiny race before the caller binds
    it is acceptable on a test machine and far better than fixed ports, since
    several test sessions share the machine.
    """
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
