"""Latency of the hub service's REST API with 50 concurrent users.

50 hub users, each with their own token (scopes custom:hubml:*), each holding one
job, call ``GET /services/hubml/api/v1/jobs`` (their job list: token check with
JupyterHub (cached by HubAuth), label-selected Job and Pod lists from the API
server, status assembly) back to back, all at once, through
configurable-http-proxy. The peer: JupyterHub's own ``GET /hub/api/user`` with
the same tokens, the same concurrency, the same proxy.

Two rounds: *burst* (every user sends its next request as soon as the last
answered: 50 requests always in flight, a stress test) and *polling* (each user
waits ``--poll`` seconds between requests, as a notebook's live view does).
Prints p50/p95/p99 of both services per round, the ratio of p99s, and p99
against the 100 ms target.

Usage::

    .venv/bin/python bench/hub_ext_api.py [--users 50] [--requests 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
from hub_ext_common import percentile, running_stack


async def load(urls_tokens: list[tuple[str, str]], per_user: int, think: float = 0.0) -> list[float]:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def user(url: str, token: str) -> None:
            headers = {"Authorization": f"token {token}"}
            for _ in range(per_user):
                t0 = time.perf_counter()
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: {resp.status}")
                latencies.append(time.perf_counter() - t0)
                if think:
                    await asyncio.sleep(think)

        await asyncio.gather(*(user(u, t) for u, t in urls_tokens))
    return latencies


def summary(name: str, lat: list[float]) -> str:
    return (f"{name}: n={len(lat)} p50 {percentile(lat, 50) * 1000:.1f} ms, p95 {percentile(lat, 95) * 1000:.1f} ms, "
            f"p99 {percentile(lat, 99) * 1000:.1f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="requests per user per round")
    parser.add_argument("--poll", type=float, default=1.0, help="pause between a user's requests when polling")
    args = parser.parse_args()
    users = [f"user{i:02d}" for i in range(args.users)]
    async with running_stack(users) as (svc, _cluster):
        for u in users:  # one job each, so the lists are not empty
            status, body = await asyncio.to_thread(svc.call, "POST", "/jobs", {"code": "print(1)\n"}, user=u)
            if status != 201:
                raise RuntimeError(f"{u}: {status} {body}")
        service = [(svc.url + "api/v1/jobs", svc.tokens[u]) for u in users]
        hub = [(svc.hub.api_url + "/user", svc.tokens[u]) for u in users]
        await load(service, 2)  # warm-up: HubAuth caches each token once
        await load(hub, 2)
        for mode, think in (("burst (no pause between requests)", 0.0),
                            (f"polling (each user every {args.poll:g} s, like the %%train watch)", args.poll)):
            a = await load(service, args.requests, think)
            b = await load(hub, args.requests, think)
            print(f"-- {args.users} concurrent users, {mode}")
            print(summary("hubml GET /jobs      ", a))
            print(summary("JupyterHub GET /user ", b))
            p99 = percentile(a, 99)
            print(f"ratio p99 hubml/JupyterHub = {p99 / percentile(b, 99):.2f}")
            print(f"API p99: {p99 * 1000:.1f} ms (target < 100 ms): {'OK' if p99 < 0.1 else 'OVER TARGET'}")


if __name__ == "__main__":
    asyncio.run(main())
