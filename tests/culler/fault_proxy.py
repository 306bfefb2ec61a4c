"""A small HTTP proxy in front of the real hub that injects faults.

Runs in the test's event loop; everything not matched by a fault is forwarded
unchanged to the hub, so the culler talks to the real API except where a test
wants a 5xx, a hang, or a refused stop.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer

from hubml_testing.ports import free_port


@dataclass
class Fault:
    method: str  # "GET", "DELETE", ... or "*"
    path_regex: str  # matched against path + query
    status: int | None = None  # answer this instead of forwarding
    delay: float = 0.0  # sleep before answering/forwarding
    times: int | None = None  # None: always; N: the next N matches
    hits: int = 0


@dataclass
class FaultProxy:
    target: str  # e.g. http://127.0.0.1:PORT (the hub's public URL, no trailing slash)
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    _server: HTTPServer | None = None

    def add(self, method: str, path_regex: str, **kw) -> Fault:
        f = Fault(method, path_regex, **kw)
        self.faults.append(f)
        return f

    def clear(self) -> None:
        self.faults.clear()
        self.seen.clear()

    def _match(self, method: str, uri: str) -> Fault | None:
        for f in self.faults:
            if f.method in ("*", method) and re.search(f.path_regex, uri):
                if f.times is not None and f.hits >= f.times:
                    continue
                f.hits += 1
                return f
        return None

    def start(self) -> "FaultProxy":
        proxy = self
        client = AsyncHTTPClient(force_instance=True)

        class Handler(web.RequestHandler):
            SUPPORTED_METHODS = ("GET", "POST", "DELETE", "PATCH", "PUT")

            async def _any(self):
                req = self.request
                proxy.seen.append((req.method, req.uri))
                fault = proxy._match(req.method, req.uri)
                if fault and fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault and fault.status:
                    self.set_status(fault.status)
                    self.finish({"status": fault.status, "message": "injected fault"})
                    return
                headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host", "content-length")}
                resp = await client.fetch(
                    HTTPRequest(
                        proxy.target + req.uri, method=req.method, headers=headers,
                        body=req.body if req.method in ("POST", "PUT", "PATCH") or req.body else None,
                        allow_nonstandard_methods=True, follow_redirects=False, request_timeout=60,
                    ),
                    raise_error=False,
                )
                self.set_status(resp.code)
                for k in ("Content-Type",):
                    if k in resp.headers:
                        self.set_header(k, resp.headers[k])
                # pagination links point at the hub; rewrite them to us
                body = resp.body or b""
                body = body.replace(proxy.target.encode(), proxy.url.encode())
                if resp.code not in (204, 304):
                    self.write(body)
                self.finish()

            get = post = delete = patch = put = _any

        port = free_port()
        self._server = HTTPServer(web.Application([(r".*", Handler)]))
        self._server.listen(port, "127.0.0.1")
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
