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


def _message(msg_type: str, content: dict, session: str) -> tuple[str, str]:
    """One Jupyter message for the channels websocket; (its JSON, its msg_id)."""
    msg_id = uuid.uuid4().hex
    return json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": session, "msg_type": msg_type,
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [], "content": content,
    }), msg_id


async def _wait_for_iopub(ws: WebSocketClientConnection, session: str, timeout: float = 60) -> None:
    """Return once this connection's iopub subscription is live. A fresh websocket's iopub
    subscription is set up asynchronously by the server (ZMQ's slow joiner), so output a cell
    makes in its first milliseconds can be lost; like jupyter_client's ``wait_for_ready`` we
    send kernel_info_request until both its reply and an iopub status for it have arrived."""
    deadline = time.monotonic() + timeout
    sent: set[str] = set()  # a slow kernel's answer to an earlier request counts too
    replied, seen_iopub = set(), set()
    while time.monotonic() < deadline:
        raw_msg, msg_id = _message("kernel_info_request", {}, session)
        sent.add(msg_id)
        ws.write_message(raw_msg)
        retry_at = min(time.monotonic() + 1.0, deadline)
        while time.monotonic() < retry_at:
            try:
                raw = await asyncio.wait_for(ws.read_message(), max(0.01, retry_at - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if raw is None:
                raise AssertionError("the kernel's websocket closed before the kernel answered kernel_info")
            msg = json.loads(raw)
            parent = msg.get("parent_header", {}).get("msg_id")
            if parent not in sent:
                continue
            (replied if msg["msg_type"] == "kernel_info_reply" else seen_iopub).add(parent)
            if replied & seen_iopub:
                return
    raise AssertionError(f"the kernel did not answer kernel_info on both channels in {timeout}s")


async def _send_execute(kernel: PodKernel, code: str) -> tuple[WebSocketClientConnection, str]:
    """Connect to the kernel's channels, wait until its iopub is live, and send one
    execute_request; (the socket, its msg_id)."""
    ws = await websocket_connect(HTTPRequest(kernel.ws_url, headers={"Authorization": f"token {kernel.token}"}))
    session = uuid.uuid4().hex
    try:
        await _wait_for_iopub(ws, session)
    except BaseException:
        ws.close()
        raise
    raw_msg, msg_id = _message("execute_request", {
        "code": code, "silent": False, "store_history": False, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": True}, session)
    ws.write_message(raw_msg)
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
    """Run ``code`` in the kernel; (its stream output and tracebacks, the reply's status).

    The cell is over once both its execute_reply (shell) and its idle status (iopub) have
    arrived: the two channels are not ordered, so either may come first, and output on
    iopub is complete only at idle."""
    ws, msg_id = await _send_execute(kernel, code)
    out: list[str] = []
    status, idle, deadline = "", False, time.monotonic() + timeout
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
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            if status and idle:
                return "".join(out), status
        raise AssertionError(f"no reply from the kernel in {timeout}s; output so far: {''.join(out)!r}")
    finally:
        ws.close()
