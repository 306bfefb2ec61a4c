"""JupyterHub REST API and single-user server reads for the culler.

Bounded concurrency: every request, to the hub or to a user's server, takes a
slot of one semaphore, so a pass over 10,000 servers never has more than
``concurrency`` requests in flight. User pages are prefetched: the next page is
requested as soon as the current one arrives, while the current users are being
processed.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .policy import Kernel


class HubError(Exception):
    """The hub did not give a usable answer (5xx, timeout, garbage)."""


def parse_time(value: Any) -> datetime | None:
    """ISO 8601 from the hub / jupyter_server (``Z`` or offset) → aware datetime."""
    if not value or not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt


@dataclass
class StopResult:
    stopped: bool  # True: the hub says it is stopped (204)
    pending: bool  # True: 202, the spawner is still stopping
    error: str = ""


class HubClient:
    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        server_base_url: str,
        concurrency: int = 10,
        page_size: int = 200,
        timeout: float = 30,
        kernel_timeout: float = 10,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.server_base_url = server_base_url.rstrip("/")
        self.token = token
        self.page_size = page_size
        self.timeout = timeout
        self.kernel_timeout = kernel_timeout
        self.semaphore = asyncio.Semaphore(concurrency)
        self.client = AsyncHTTPClient(force_instance=True, max_clients=max(concurrency, 1))
        self.requests: collections.Counter[str] = collections.Counter()

    def close(self) -> None:
        self.client.close()

    async def _fetch(self, kind: str, req: HTTPRequest):
        """Fetch under the concurrency bound; HTTP error codes come back as
        responses, transport failures (timeouts, refused) as :class:`HubError`."""
        async with self.semaphore:
            self.requests[kind] += 1
            try:
                return await self.client.fetch(req, raise_error=False)
            except (HTTPClientError, OSError, asyncio.TimeoutError) as e:
                raise HubError(f"{req.method} {req.url}: {e}") from None

    def _req(self, url: str, method: str = "GET", body: Any = None, timeout: float | None = None, **extra) -> HTTPRequest:
        headers = {"Authorization": f"token {self.token}", **extra.pop("headers", {})}
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        return HTTPRequest(
            url,
            method=method,
            body=data,
            headers=headers,
            request_timeout=timeout or self.timeout,
            connect_timeout=timeout or self.timeout,
            allow_nonstandard_methods=True,
            **extra,
        )

    async def _json(self, kind: str, req: HTTPRequest) -> Any:
        resp = await self._fetch(kind, req)
        if resp.code != 200:
            raise HubError(f"{req.method} {req.url} -> {resp.code} {resp.reason or resp.error}")
        try:
            return json.loads(resp.body)
        except ValueError as e:
            raise HubError(f"{req.url}: not JSON ({e})") from None

    async def users_with_ready_servers(self) -> AsyncIterator[dict]:
        """Every user with a ready server, page by page, next page prefetched.

        Raises :class:`HubError` when any page fails: the caller must then treat
        the list as partial.
        """
        params = {"state": "ready", "limit": str(self.page_size), "offset": "0"}
        url: str | None = f"{self.api_url}/users?{urlencode(params)}"
        accept = {"Accept": "application/jupyterhub-pagination+json"}
        future = asyncio.ensure_future(self._json("list-users", self._req(url, headers=accept)))
        while future is not None:
            model = await future
            future = None
            if not isinstance(model, dict) or not isinstance(model.get("items"), list):
                raise HubError(f"user list is not a paginated model: {str(model)[:200]}")
            nxt = (model.get("_pagination") or {}).get("next")
            if nxt:
                future = asyncio.ensure_future(
                    self._json("list-users", self._req(nxt["url"], headers=accept))
                )
            for user in model["items"]:
                yield user

    async def user(self, user: str) -> dict:
        """One user's fresh model (``GET /users/:name``, ``read:servers`` is enough
        for its ``servers``), used to re-check a server just before stopping it.

        Raises :class:`HubError` on any failure (5xx, 404, timeout, garbage): the
        caller must then not act.
        """
        url = f"{self.api_url}/users/{quote(user, safe='')}"
        model = await self._json("get-user", self._req(url))
        if not isinstance(model, dict):
            raise HubError(f"GET {url}: not a user model: {str(model)[:200]}")
        return model

    async def kernels(self, server_url: str) -> tuple[tuple[Kernel, ...] | None, str]:
        """The server's kernels via ``access:servers``; ``(None, why)`` on failure.

        ``no_track_activity`` keeps jupyter_server from counting this read as
        user activity.
        """
        url = f"{self.server_base_url}{server_url}api/kernels?no_track_activity=1"
        try:
            resp = await self._fetch("kernels", self._req(url, timeout=self.kernel_timeout, follow_redirects=False))
        except HubError as e:
            return None, str(e)
        if resp.code != 200:
            return None, f"{url} -> {resp.code}"
        try:
            models = json.loads(resp.body)
            kernels = tuple(
                Kernel(
                    id=str(m["id"]),
                    execution_state=str(m.get("execution_state") or "unknown"),
                    last_activity=parse_time(m.get("last_activity")),
                    connections=int(m.get("connections") or 0),
                )
                for m in models
            )
        except (ValueError, TypeError, KeyError) as e:
            return None, f"{url}: bad kernel list ({e})"
        return kernels, ""

    async def server_activity(self, server_url: str) -> tuple[datetime | None, str]:
        """The server's own ``last_activity`` from jupyter_server's ``api/status``.

        jupyter_server computes it from its kernels, terminals and tracked API
        requests and does not track reads of ``api/status`` itself, so unlike
        the hub's value it never holds the echo of our own reads through the
        proxy. ``(None, why)`` on failure.
        """
        url = f"{self.server_base_url}{server_url}api/status"
        try:
            resp = await self._fetch("status", self._req(url, timeout=self.kernel_timeout, follow_redirects=False))
        except HubError as e:
            return None, str(e)
        if resp.code != 200:
            return None, f"{url} -> {resp.code}"
        try:
            model = json.loads(resp.body)
            when = parse_time(model.get("last_activity")) if isinstance(model, dict) else None
        except (ValueError, TypeError) as e:
            return None, f"{url}: bad status ({e})"
        if when is None:
            return None, f"{url}: no last_activity"
        return when, ""

    async def stop_server(self, user: str, name: str, *, remove: bool = False) -> StopResult:
        if name:
            url = f"{self.api_url}/users/{quote(user, safe='')}/servers/{quote(name, safe='')}"
        else:
            url = f"{self.api_url}/users/{quote(user, safe='')}/server"
        body = {"remove": True} if (name and remove) else None
        try:
            resp = await self._fetch("stop", self._req(url, "DELETE", body))
        except HubError as e:
            return StopResult(False, False, str(e))
        if resp.code == 204:
            return StopResult(stopped=True, pending=False)
        if resp.code == 202:
            return StopResult(stopped=False, pending=True)
        return StopResult(False, False, f"DELETE {url} -> {resp.code}")

    async def delete_user(self, user: str) -> bool:
        url = f"{self.api_url}/users/{quote(user, safe='')}"
        try:
            resp = await self._fetch("delete-user", self._req(url, "DELETE"))
        except HubError:
            return False
        return resp.code == 204
