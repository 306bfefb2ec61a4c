"""Telling users before their server is culled.

The grace period only helps if the user hears about it. Two channels:

* :class:`NoticeBoard` keeps the pending notices; the culler's web endpoint
  (``/services/<name>/notices`` and the HTML page ``/services/<name>/``) shows a
  signed-in user *their own* notices, so the hub page links to it and JupyterLab
  can poll it with the user's token;
* :class:`WebhookNotifier` POSTs a JSON event (``warning``, ``cancelled``,
  ``culled``) to a URL, e.g. a chat bridge. Webhook failures are logged and
  never stop a pass.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Protocol

from tornado.httpclient import AsyncHTTPClient, HTTPRequest


@dataclass(frozen=True)
class Notice:
    user: str
    server: str
    reason: str
    profile: str | None
    gpus: int
    idle_since: datetime | None
    warned_at: datetime
    cull_at: datetime

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("idle_since", "warned_at", "cull_at"):
            if out[key] is not None:
                out[key] = out[key].isoformat()
        return out


class Notifier(Protocol):
    async def warn(self, notice: Notice) -> None: ...
    async def cancel(self, user: str, server: str, why: str) -> None: ...
    async def culled(self, user: str, server: str, reason: str) -> None: ...


class NoticeBoard:
    """In-memory pending notices, keyed by (user, server)."""

    def __init__(self) -> None:
        self._notices: dict[tuple[str, str], Notice] = {}

    async def warn(self, notice: Notice) -> None:
        self._notices[(notice.user, notice.server)] = notice

    async def cancel(self, user: str, server: str, why: str) -> None:
        self._notices.pop((user, server), None)

    async def culled(self, user: str, server: str, reason: str) -> None:
        self._notices.pop((user, server), None)

    def for_user(self, user: str) -> list[Notice]:
        return [n for (u, _), n in sorted(self._notices.items()) if u == user]

    def __len__(self) -> int:
        return len(self._notices)


class WebhookNotifier:
    def __init__(self, url: str, *, timeout: float = 10, log: logging.Logger | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.log = log or logging.getLogger("hubml.culler")
        self.client = AsyncHTTPClient()

    async def _post(self, payload: dict) -> None:
        req = HTTPRequest(
            self.url,
            method="POST",
            body=json.dumps(payload),
            headers={"Content-Type": "application/json"},
            request_timeout=self.timeout,
            connect_timeout=self.timeout,
        )
        try:
            resp = await self.client.fetch(req, raise_error=False)
            if resp.code >= 400:
                self.log.warning("webhook %s answered %s", self.url, resp.code)
        except Exception as e:  # a webhook must never break a pass
            self.log.warning("webhook %s failed: %s", self.url, e)

    async def warn(self, notice: Notice) -> None:
        await self._post({"event": "warning", **notice.to_json()})

    async def cancel(self, user: str, server: str, why: str) -> None:
        await self._post({"event": "cancelled", "user": user, "server": server, "reason": why})

    async def culled(self, user: str, server: str, reason: str) -> None:
        await self._post({"event": "culled", "user": user, "server": server, "reason": reason})
