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

import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from emailrelay import api, tracing
from emailrelay.bridge.nats import IncomingRequest, NatsConnection, RequestSubscription
from emailrelay.discovery import error_headers
from emailrelay.handlers.replies import error_reply
from emailrelay.metrics import REQUEST_SECONDS, REQUESTS, REQUESTS_IN_FLIGHT

log = logging.getLogger(__name__)

Handler = Callable[[bytes], Awaitable[bytes]]


class RequestStats(Protocol):
    """Per-subject counters (the ``$SRV.STATS`` answer, see emailrelay.discovery)."""

    def record(self, subject: str, elapsed_ns: int, error: str | None) -> None: ...


class RequestServer:
    """The contract subjects' queue subscriptions and the handlers behind them.

    Routes may be added while serving (status and analytics appear once the
    KV store becomes available); all of them feed one bounded dispatcher.
    """

    def __init__(
        self, nats: NatsConnection, max_in_flight: int, stats: RequestStats | None = None
    ) -> None:
        self._nats = nats
        self._max_in_flight = max_in_flight
        self._stats = stats
        self._routes: dict[str, Handler] = {}
        self._subscriptions: list[RequestSubscription] = []
        self._send, self._receive = anyio.create_memory_object_stream[IncomingRequest](
            max_in_flight
        )
        self._stopping = False

    @property
    def subjects(self) -> list[str]:
        return list(self._routes)

    async def add_routes(self, routes: Mapping[str, Handler]) -> bool:
        """Subscribe to more subjects; ``False`` once stopping (nothing added)."""
        if self._stopping:
            return False
        for subject, handler in routes.items():
            self._routes[subject] = handler
            self._subscriptions.append(
                await self._nats.subscribe_requests(subject, api.QUEUE_GROUP, self._send)
            )
        log.info("serving requests", extra={"subjects": sorted(routes), "queue": api.QUEUE_GROUP})
        return True

    async def serve(self, stopping: anyio.Event, grace: float) -> None:
        """Handle requests until ``stopping``; then drain and let handlers
        finish within ``grace`` seconds."""
        handlers_scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                _dispatch,
                self._receive,
                self._routes,
                self._max_in_flight,
                handlers_scope,
                self._stats,
            )
            await stopping.wait()
            self._stopping = True
            started = time.monotonic()
            handlers_scope.deadline = anyio.current_time() + grace
            for subscription in self._subscriptions:
                await subscription.drain()
            self._send.close()
        log.info(
            "stopped serving requests",
            extra={
                "drain_seconds": round(time.monotonic() - started, 3),
                "cut_off": handlers_scope.cancel_called,
            },
        )


async def serve_requests(
    nats: NatsConnection,
    routes: Mapping[str, Handler],
    max_in_flight: int,
    stopping: anyio.Event,
    grace: float,
    stats: RequestStats | None = None,
) -> None:
    """Serve a fixed set of routes (see :class:`RequestServer`)."""
    server = RequestServer(nats, max_in_flight, stats)
    await server.add_routes(routes)
    await server.serve(stopping, grace)


async def _dispatch(
    requests: MemoryObjectReceiveStream[IncomingRequest],
    routes: Mapping[str, Handler],
    max_in_flight: int,
    scope: anyio.CancelScope,
    stats: RequestStats | None,
) -> None:
    limiter = anyio.CapacityLimiter(max_in_flight if max_in_flight else math.inf)
    with scope:
        async with anyio.create_task_group() as handlers, requests:
            async for request in requests:
                await limiter.acquire_on_behalf_of(request)
                handlers.start_soon(_handle, request, routes[request.subject], limiter, stats)


async def _handle(
    request: IncomingRequest,
    handler: Handler,
    limiter: anyio.CapacityLimiter,
    stats: RequestStats | None,
) -> None:
    started = time.perf_counter_ns()
    REQUESTS_IN_FLIGHT.inc()
    try:
        with tracing.server_span(request.subject, request.headers) as span:
            try:
                reply = await handler(request.data)
            except Exception:
                # Never let internal exception text reach a caller.
                log.exception("handler failed", extra={"subject": request.subject})
                reply = error_reply(api.ERR_INTERNAL)
            error = contract_error(reply)
            if error is not None:
                tracing.set_error(span, error)
            try:
                await request.respond(reply, None if error is None else error_headers(error))
            except Exception as exc:
                log.warning(
                    "reply not sent", extra={"subject": request.subject, "error": repr(exc)}
                )
        elapsed_ns = time.perf_counter_ns() - started
        REQUESTS.labels(request.subject, _outcome(error)).inc()
        REQUEST_SECONDS.labels(request.subject).observe(elapsed_ns / 1e9)
        if stats is not None:
            stats.record(request.subject, elapsed_ns, error)
    finally:
        REQUESTS_IN_FLIGHT.dec()
        limiter.release_on_behalf_of(request)


_ERROR_REPLY = re.compile(rb'\{\s*"error"\s*:')
_CONTRACT_ERRORS = frozenset(
    value for name, value in vars(api).items() if name.startswith("ERR_") and isinstance(value, str)
)


def contract_error(reply: bytes) -> str | None:
    """The error string of an error reply (``{"error": ...}``), else ``None``."""
    if not _ERROR_REPLY.match(reply):
        return None
    try:
        error = json.loads(reply).get("error")
    except ValueError:
        return None
    return error if isinstance(error, str) else None


def _outcome(error: str | None) -> str:
    """A metric label: ``ok`` or a contract error string (a small fixed set)."""
    if error is None:
        return "ok"
    return error if error in _CONTRACT_ERRORS else "other error"
