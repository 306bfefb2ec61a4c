"""Driving a kernel in a real single-user server the way JupyterLab does: start it over the
server's REST API, run code over its websocket (the Jupyter messaging protocol). Used by the
real-node tests; ``hubml_testing.jupyterhub.Browser`` is the browser side."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from typing import NamedTuple

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect


class PodKernel(NamedTuple):
    ws_url: str
    token: str  # sent in the Authorization header: JupyterHub refuses tokens in URLs


def start_kernel(hub_url: str, user: str, token: str) -> PodKernel:
    """Start a python3 kernel in ``user``'s server through the proxy."""
    api = f"{hub_url}user/{user}/api/kernels"
    req = urllib.request.Request(api, data=b'{"name": "python3"}', method="POST",
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        kernel = json.loads(r.read())
    return PodKernel(f"{api.replace('http://', 'ws://')}/{kernel['id']}/channels", token)


async def _send_execute(kernel: PodKernel, code: str) -> tuple[WebSocketClientConnection, str]:
    """Connect to the kernel's channels and send one execute_request; (the socket, its msg_id)."""
    ws = await websocket_connect(HTTPRequest(kernel.ws_url, headers={"Authorization": f"token {kernel.token}"}))
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    return ws, msg_id


async def submit_and_leave(kernel: PodKernel, code: str, timeout: float = 60) -> None:
    """Start ``code`` and close the tab: return once the kernel says it is busy with it,
    leaving no client connected (what a user who walks away from a running cell leaves)."""
    ws, msg_id = await _send_execute(kernel, code)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            raw = await asyncio.wait_for(ws.read_message(), deadline - time.monotonic())
            if raw is None:
                raise AssertionError("the kernel's websocket closed before the cell started")
            msg = json.loads(raw)
            if (msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "busy"):
                return
        raise AssertionError(f"the kernel did not start the cell in {timeout}s")
    finally:
        ws.close()


async def execute(kernel: PodKernel, code: str, timeout: float = 120) -> tuple[str, str]:
    """Run ``code`` in the kernel; (its stream output and tracebacks, the reply's status)."""
    ws, msg_id = await _send_execute(kernel, code)
    out: list[str] = []
    status, deadline = "", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            raw = await asyncio.wait_for(ws.read_message(), deadline - time.monotonic())
            if raw is None:
                raise AssertionError(f"the kernel's websocket closed; output so far: {''.join(out)!r}")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                out.append("\n".join(msg["content"]["traceback"]))
            elif kind in ("execute_result", "display_data"):
                out.append(msg["content"]["data"].get("text/plain", "") + "\n")
            elif kind == "execute_reply":
                status = msg["content"]["status"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle" and status:
                return "".join(out), status
        raise AssertionError(f"no reply from the kernel in {timeout}s; output so far: {''.join(out)!r}")
    finally:
        ws.close()
