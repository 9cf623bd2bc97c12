"""The ceilings: each part of a send alone, under the relay's own trio-asyncio loop.

- ``responder``: a NATS responder that replies a constant, through the same
  path the relay's requests take (``NatsConnection.subscribe_requests``
  handing each message to a trio channel, a dispatcher starting one task per
  request under a ``CapacityLimiter``). Serves until SIGTERM; the benchmark
  drives it with the load generator, as it drives the relay.
- ``smtp``: the relay's SMTP pool (built by ``emailrelay.app.build_smtp_pool``
  from the same settings the relay gets: ``SmtpPool`` over ``SmtpConnection``)
  sending a ~2 KB message to the sink, ``--c`` sends in flight.
- ``kv``: what one send costs the store, ``TrackingStore.create_record`` then
  ``append_to_group`` into one group, over the real JetStream KV buckets
  (opened as the relay opens them, ``emailrelay.app.open_tracking_store``).

``smtp`` and ``kv`` warm up with ``--c`` operations, then run ``--n`` and
print one JSON line: seconds, latencies and the process's CPU seconds.

    python -m benchmarks.sendbench.ceilings responder --url nats://... --subject S
    python -m benchmarks.sendbench.ceilings smtp --smtp-port P --pool-size 16 --n 2000 --c 64
    python -m benchmarks.sendbench.ceilings kv --url nats://... --n 2000 --c 64
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.message import EmailMessage

import anyio
import trio
import trio_asyncio

from emailrelay import api
from emailrelay.bridge.nats import IncomingRequest, NatsConnection

CONSTANT_REPLY = b'{"ok":true}'


# --- (a) the trivial responder ---------------------------------------------


async def respond(max_in_flight: int, url: str, subject: str) -> None:
    async with trio_asyncio.open_loop():
        nats = await NatsConnection.connect([url], None, give_up_after=10)
        send, receive = anyio.create_memory_object_stream[IncomingRequest](max_in_flight)
        subscription = await nats.subscribe_requests(subject, api.QUEUE_GROUP, send)
        print("ready", flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_dispatch, receive, max_in_flight)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
            await subscription.drain()
            send.close()
        await nats.drain()


async def _dispatch(
    requests: anyio.abc.ObjectReceiveStream[IncomingRequest], max_in_flight: int
) -> None:
    """As emailrelay.server dispatches: one task per request, bounded."""
    limiter = anyio.CapacityLimiter(max_in_flight or math.inf)

    async def handle(request: IncomingRequest) -> None:
        try:
            await request.respond(CONSTANT_REPLY)
        finally:
            limiter.release_on_behalf_of(request)

    async with anyio.create_task_group() as handlers, requests:
        async for request in requests:
            await limiter.acquire_on_behalf_of(request)
            handlers.start_soon(handle, request)


# --- driving (b) and (c) ------------------------------------------------------


async def measure(operation: Callable[[int], Awaitable[None]], n: int, c: int) -> dict[str, object]:
    """Warm up with ``c`` operations, then time ``n`` with ``c`` in flight."""
    latencies: list[float] = []

    async def run(count: int, record: bool) -> None:
        numbers = iter(range(count))

        async def worker() -> None:
            for number in numbers:
                started = time.perf_counter()
                await operation(number)
                if record:
                    latencies.append(time.perf_counter() - started)

        async with anyio.create_task_group() as tg:
            for _ in range(max(1, min(c, count))):
                tg.start_soon(worker)

    await run(c, record=False)
    cpu, started = time.process_time(), time.perf_counter()
    await run(n, record=True)
    return {
        "seconds": time.perf_counter() - started,
        "cpu": time.process_time() - cpu,
        "latencies": latencies,
    }


def ceiling_message() -> bytes:
    """A message of the size the load generator's requests become (~2 KB)."""
    from benchmarks.sendbench.loadgen import HTML, TEXT

    message = EmailMessage()
    message["From"] = "LFX Self Serve <noreply@lfx.linuxfoundation.org>"
    message["To"] = "attendee@example.org"
    message["Subject"] = "Your invitation to the Open Source Summit"
    message["X-LFX-TRACKING-ID"] = "ceiling/00000000-0000-4000-8000-000000000000"
    message.set_content(TEXT)
    message.add_alternative(HTML, subtype="html")
    return message.as_bytes().replace(b"\n", b"\r\n")


def relay_settings(environ: dict[str, str]) -> object:
    from emailrelay.config import load_settings

    return load_settings(environ)


# --- (b) the SMTP pool alone ------------------------------------------------


async def smtp_pool(args: argparse.Namespace) -> dict[str, object]:
    from emailrelay.app import build_smtp_pool

    environ = {
        "EMAIL_ENABLED": "true",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(args.smtp_port),
        "SMTP_TLS_MODE": "none",
    }
    if args.pool_size:
        environ["SMTP_POOL_SIZE"] = str(args.pool_size)
    message = ceiling_message()
    async with trio_asyncio.open_loop():
        pool = build_smtp_pool(relay_settings(environ))  # type: ignore[arg-type]

        async def send(number: int) -> None:
            await pool.send("noreply@lfx.linuxfoundation.org", "attendee@example.org", message)

        try:
            return await measure(send, args.n, args.c)
        finally:
            with anyio.CancelScope(shield=True):
                await pool.aclose()


# --- (c) the KV writes of one send -------------------------------------------


async def kv_writes(args: argparse.Namespace) -> dict[str, object]:
    from emailrelay.app import open_tracking_store

    settings = relay_settings({"NATS_URL": args.url})
    group = f"ceiling-{uuid.uuid4()}"
    async with trio_asyncio.open_loop():
        nats = await NatsConnection.connect([args.url], None, give_up_after=10)
        try:
            store = await open_tracking_store(nats, settings)  # type: ignore[arg-type]
            if store is None:
                raise SystemExit("the KV store is not available")

            async def write(number: int) -> None:
                record = api.TrackingRecord(
                    group_id=group,
                    email_id=str(uuid.uuid4()),
                    to=f"attendee{number}@example.org",
                    subject="Your invitation to the Open Source Summit",
                    sent_at=datetime.now(UTC),
                )
                await store.create_record(record)
                await store.append_to_group(group, record.email_id)

            return await measure(write, args.n, args.c)
        finally:
            await nats.drain()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("responder", "smtp", "kv"))
    parser.add_argument("--url", default="")
    parser.add_argument("--subject", default="bench.ceiling.responder")
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--smtp-port", type=int, default=0)
    parser.add_argument("--pool-size", type=int, default=0, help="0: the relay's default")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--c", type=int, default=64)
    args = parser.parse_args()
    if args.kind == "responder":
        trio.run(respond, args.max_in_flight, args.url, args.subject)
        return
    run = smtp_pool if args.kind == "smtp" else kv_writes
    print(json.dumps(trio.run(run, args)), flush=True)


if __name__ == "__main__":
    main()
