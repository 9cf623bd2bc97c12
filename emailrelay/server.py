"""The NATS subscription loop: requests in, one reply out for each.

nats-py's callback hands every message to a memory channel; one task reads
the channel and starts a handler per message, at most ``max_in_flight`` at
once (beyond that the channel fills, the callback waits, and nats-py buffers:
a burst waits, nothing is dropped unanswered).

Stopping (SIGTERM, or a fatal failure elsewhere) drains the subscriptions
first, which delivers what nats-py already buffered, then lets every handler
finish and reply within the grace period.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from emailrelay import api
from emailrelay.bridge.nats import IncomingRequest, NatsConnection
from emailrelay.handlers.replies import error_reply

log = logging.getLogger(__name__)

Handler = Callable[[bytes], Awaitable[bytes]]


async def serve_requests(
    nats: NatsConnection,
    routes: Mapping[str, Handler],
    max_in_flight: int,
    stopping: anyio.Event,
    grace: float,
) -> None:
    send_stream, receive_stream = anyio.create_memory_object_stream[IncomingRequest](max_in_flight)
    subscriptions = [
        await nats.subscribe_requests(subject, api.QUEUE_GROUP, send_stream) for subject in routes
    ]
    log.info("serving requests", extra={"subjects": sorted(routes), "queue": api.QUEUE_GROUP})

    handlers_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_dispatch, receive_stream, routes, max_in_flight, handlers_scope)
        await stopping.wait()
        started = time.monotonic()
        handlers_scope.deadline = anyio.current_time() + grace
        with anyio.move_on_after(grace):
            for subscription in subscriptions:
                await subscription.drain()
        send_stream.close()
    log.info(
        "stopped serving requests",
        extra={
            "drain_seconds": round(time.monotonic() - started, 3),
            "cut_off": handlers_scope.cancel_called,
        },
    )


async def _dispatch(
    requests: MemoryObjectReceiveStream[IncomingRequest],
    routes: Mapping[str, Handler],
    max_in_flight: int,
    scope: anyio.CancelScope,
) -> None:
    limiter = anyio.CapacityLimiter(max_in_flight if max_in_flight else math.inf)
    with scope:
        async with anyio.create_task_group() as handlers, requests:
            async for request in requests:
                await limiter.acquire_on_behalf_of(request)
                handlers.start_soon(_handle, request, routes[request.subject], limiter)


async def _handle(
    request: IncomingRequest, handler: Handler, limiter: anyio.CapacityLimiter
) -> None:
    try:
        try:
            reply = await handler(request.data)
        except Exception:
            # Never let internal exception text reach a caller.
            log.exception("handler failed", extra={"subject": request.subject})
            reply = error_reply(api.ERR_INTERNAL)
        try:
            await request.respond(reply)
        except Exception as exc:
            log.warning("reply not sent", extra={"subject": request.subject, "error": repr(exc)})
    finally:
        limiter.release_on_behalf_of(request)
