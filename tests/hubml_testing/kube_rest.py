"""A small synchronous REST client for the test API server (standard library only), so set-up,
readiness probes and scale mode run outside any event loop."""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any


from hubml_testing.kube_binaries import KubeHarnessError

class Rest:
    """Minimal thread-safe Kubernetes REST client over keep-alive HTTPS connections."""

    def __init__(self, server: str, token: str, ca_file: Path) -> None:
        url = urllib.parse.urlsplit(server)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 443
        self.token = token
        self.ctx = ssl.create_default_context(cafile=str(ca_file))
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
            self._local.conn = conn
        return conn

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        return resp.status, payload

    def must(self, method: str, path: str, body: Any = None, ok: Iterable[int] = (200, 201), **kw: Any) -> Any:
        status, payload = self.request(method, path, body, **kw)
        if status not in tuple(ok):
            msg = payload.get("message") if isinstance(payload, dict) else payload
            raise KubeHarnessError(f"{method} {path} answered {status}: {msg}")
        return payload
