"""Requests/s of a slow endpoint: emailrelay's request loop (with $SRV stats,
metrics and the tracing hook) against nats-py's ``nats.micro`` framework,
same run, same handler latency, same load.

Why the relay answers ``$SRV`` from its own subscriptions instead of serving
the contract endpoints through ``nats.micro``: the framework awaits each
handler inside the subscription callback, so one endpoint serves one request
at a time. With a handler that takes ``--latency`` seconds (an SMTP
transaction, a KV write), that caps an endpoint at about 1/latency requests/s.

Starts its own nats-server on loopback. The load comes from one client
(a separate process on plain asyncio) with ``--concurrency`` requests in
flight. After each run, ``$SRV.STATS`` is asked and its request count printed.

    python benchmarks/bench_discovery.py [--requests 1000] [--latency 0.005]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import anyio  # noqa: E402
import nats  # noqa: E402
import trio  # noqa: E402
import trio_asyncio  # noqa: E402
from nats.micro import add_service  # noqa: E402
from nats.micro.request import Request  # noqa: E402

from emailrelay.bridge.nats import NatsConnection  # noqa: E402
from emailrelay.discovery import ServiceStats, serve_discovery  # noqa: E402
from emailrelay.handlers.replies import EncodedRecords  # noqa: E402
from emailrelay.server import serve_requests  # noqa: E402
from tests.support.servers.nats import NatsServer  # noqa: E402

SUBJECT = "bench.slow"


def load(url: str, requests: int, concurrency: int, service: str) -> tuple[float, int]:
    """Seconds to get all replies, and the request count ``$SRV.STATS`` reports
    afterwards. The client is a separate process on plain asyncio (it must not
    share this process's GIL, nor trio-asyncio's event loop policy)."""
    done = subprocess.run(
        [sys.executable, __file__, "--client", url, str(requests), str(concurrency), service],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load client failed:\n{done.stderr}")
    result = json.loads(done.stdout)
    return float(result["seconds"]), int(result["counted"])


async def client(url: str, requests: int, concurrency: int, service: str) -> None:
    nc = await nats.connect(url)
    limit = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with limit:
            await nc.request(SUBJECT, b"{}", timeout=160)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    seconds = time.perf_counter() - started
    stats = json.loads((await nc.request(f"$SRV.STATS.{service}", b"", timeout=5)).data)
    counted = sum(e["num_requests"] for e in stats["endpoints"] if e["subject"] == SUBJECT)
    await nc.drain()
    print(json.dumps({"seconds": seconds, "counted": counted}))


async def run_micro(url: str, requests: int, concurrency: int, latency: float) -> tuple[float, int]:
    nc = await nats.connect(url)

    async def slow(request: Request) -> None:
        await asyncio.sleep(latency)
        await request.respond(b"{}")

    service = await add_service(nc, name="bench-micro", version="0.0.1")
    await service.add_endpoint(name="slow", subject=SUBJECT, handler=slow)
    try:
        return await asyncio.to_thread(load, url, requests, concurrency, "bench-micro")
    finally:
        await service.stop()
        await nc.drain()


async def run_emailrelay(
    url: str, requests: int, concurrency: int, latency: float
) -> tuple[float, int]:
    async def slow(data: bytes, deadline: object, headers: object) -> EncodedRecords:
        await trio.sleep(latency)
        return EncodedRecords([])

    routes = {SUBJECT: slow}
    async with trio_asyncio.open_loop():
        connection = await NatsConnection.connect([url], None, give_up_after=10)
        stopping = anyio.Event()
        service = ServiceStats(routes)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_discovery, connection, service, stopping)
                tg.start_soon(serve_requests, connection, routes, 256, stopping, 5.0, service)
                await trio.sleep(0.2)  # let both subscribe (a bench, not a test)
                seconds, counted = await trio.to_thread.run_sync(
                    load, url, requests, concurrency, "emailrelay"
                )
                stopping.set()
        finally:
            await connection.drain()
    return seconds, counted


def main() -> None:
    if sys.argv[1:2] == ["--client"]:
        url, requests, concurrency, service = sys.argv[2:6]
        asyncio.run(client(url, int(requests), int(concurrency), service))
        return
    # The relay's "disconnected" warning while its connection drains is expected here.
    logging.getLogger("emailrelay").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.005)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    # nats.micro serves one at a time: keep its run bounded (about 2-3 s).
    micro_requests = min(args.requests, max(50, int(2.5 / args.latency)))

    with NatsServer() as server:
        print(f"handler latency {args.latency * 1000:g} ms, {args.concurrency} in flight")
        print(f"emailrelay request loop: {args.requests} requests")
        relay_seconds, relay_counted = trio.run(
            run_emailrelay, server.url, args.requests, args.concurrency, args.latency
        )
        relay_rate = args.requests / relay_seconds
        print(f"  {relay_rate:8.0f} requests/s; $SRV.STATS num_requests {relay_counted}")

        print(f"nats.micro endpoint (baseline): {micro_requests} requests")
        micro_seconds, micro_counted = asyncio.run(
            run_micro(server.url, micro_requests, args.concurrency, args.latency)
        )
        micro_rate = micro_requests / micro_seconds
        print(
            f"  {micro_rate:8.0f} requests/s (1/latency = {1 / args.latency:.0f}); "
            f"$SRV.STATS num_requests {micro_counted}"
        )
    print(f"ratio emailrelay / nats.micro: {relay_rate / micro_rate:.1f}x")


if __name__ == "__main__":
    main()
