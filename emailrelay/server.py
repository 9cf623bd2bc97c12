"""The NATS subscription loop: requests in, one reply out for each.

nats-py's callback hands every message over at once (it never waits), with
its deadline (:mod:`emailrelay.deadline`), to a backlog; one task takes
requests from the backlog and starts a handler for each, at most
``max_in_flight`` at once.

The backlog is bounded. When ``max_backlog`` requests wait, the subscriptions
are paused: this replica leaves the queue group, so nats-server routes the
next requests to the other replicas (with none left, callers get "no
responders" at once rather than waiting out their timeout). Once the backlog
is down to half, they are resumed. The requests already on their way when a
pause begins still arrive; past twice the bound they are answered at once
with the subject's failure reply, never handled later.

Reads (:data:`emailrelay.api.READ_SUBJECTS`: status, analytics, suppression
get and list) take another way: they have their own budget,
``max_reads_in_flight`` running and as many again waiting, and their
subscriptions are never paused, so a full send backlog never leaves a
caller's status query without an answer. A read beyond the budget is shed:
answered at once with ``overloaded`` (NATS service error code 503), counted
in ``emailrelay_requests_shed_total`` and logged at most once a second.

Stopping (SIGTERM, or a fatal failure elsewhere) drains the subscriptions
first, which delivers what nats-py already buffered, then lets the backlog
and every handler finish within the grace period. When the grace runs out
the requests are cut off (:meth:`RequestServer.cut_off`): those still waiting
are answered with the failure reply, and the running ones see their deadline
pass, so a send that has not reached the provider stops and answers
``email delivery failed``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import anyio
import anyio.abc

from emailrelay import api, tracing
from emailrelay.bridge.nats import (
    IncomingRequest,
    NatsConnection,
    RequestSubscription,
    drain_all,
)
from emailrelay.bridge.smtp import DATA_REPLY_WAIT
from emailrelay.deadline import Deadline, request_deadline
from emailrelay.discovery import error_headers
from emailrelay.handlers.replies import Reply, encode_reply, error_reply, reply_headers
from emailrelay.metrics import (
    REQUEST_BACKLOG,
    REQUEST_INTAKE_PAUSED,
    REQUEST_SECONDS,
    REQUESTS,
    REQUESTS_IN_FLIGHT,
    REQUESTS_SHED,
)

log = logging.getLogger(__name__)

Handler = Callable[[bytes, Deadline, Mapping[str, str]], Awaitable[Reply]]
"""Request body, its deadline and its headers in, a typed reply out (encoded
here, once)."""

CUT_OFF_SECONDS = DATA_REPLY_WAIT + 1.0
"""How long handlers may still take once cut off: a send that had handed its
message over waits for the provider's final reply (at most ``DATA_REPLY_WAIT``,
see emailrelay.bridge.smtp), settles its idempotency key (bounded by
emailrelay.handlers.send.SETTLE_AFTER_DEADLINE) and hands its tracking writes
to the pending queue (a cut-off deadline leaves no tracking wait). Whatever is
still running after that is cancelled unanswered."""

REPLY_TIMEOUT = 5.0
"""A reply publish is a write into nats-py's buffer; this only bounds the odd stall."""

RESUME_RETRY_SECONDS = 1.0

SHED_LOG_INTERVAL = 1.0
"""Shed requests are logged at most this often (seconds), with their count."""


class RequestStats(Protocol):
    """Per-subject counters (the ``$SRV.STATS`` answer, see emailrelay.discovery)."""

    def record(self, subject: str, elapsed_ns: int, error: str | None) -> None: ...


@dataclass(eq=False)
class _Waiting:
    request: IncomingRequest
    deadline: Deadline


class RequestServer:
    """The contract subjects' queue subscriptions and the handlers behind them.

    Routes may be added while serving (status and analytics appear once the
    KV store becomes available); all of them feed one bounded dispatcher.
    """

    def __init__(
        self,
        nats: NatsConnection,
        max_in_flight: int,
        stats: RequestStats | None = None,
        *,
        max_backlog: int | None = None,
        send_timeout: float = 8.0,
        max_reads_in_flight: int = 16,
    ) -> None:
        self._nats = nats
        self._max_in_flight = max_in_flight
        self._max_backlog = max_backlog if max_backlog is not None else max_in_flight
        self._max_reads = max_reads_in_flight
        self._send_timeout = send_timeout
        self._stats = stats
        self._routes: dict[str, Handler] = {}
        self._subscriptions: list[RequestSubscription] = []
        self._pausable: list[RequestSubscription] = []
        # Unbounded channels: the bound is kept by pausing the subscriptions
        # and, past twice the bound, by answering at once (see _deliver);
        # reads are counted against their budget as they arrive.
        self._send, self._receive = anyio.create_memory_object_stream[_Waiting](math.inf)
        self._send_read, self._receive_read = anyio.create_memory_object_stream[_Waiting](math.inf)
        self._refuse, self._refusals = anyio.create_memory_object_stream[
            tuple[IncomingRequest, str]
        ](math.inf)
        self._waiting = 0
        self._reads = 0
        self._shed_unlogged = 0
        self._shed_logged_at = -math.inf
        self._deadlines: set[Deadline] = set()
        self._paused = False
        self._intake_changed = anyio.Event()
        self._intake_scope = anyio.CancelScope()
        self._read_intake_scope = anyio.CancelScope()
        self._intake_lock = anyio.Lock()
        self._stopping = False
        self._cut_off = False
        self._done = anyio.Event()

    async def add_routes(self, routes: Mapping[str, Handler]) -> bool:
        """Subscribe to more subjects; ``False`` once stopping (nothing added)."""
        if self._stopping:
            return False
        for subject, handler in routes.items():
            self._routes[subject] = handler
            subscription = await self._nats.queue_subscribe(subject, api.QUEUE_GROUP, self._deliver)
            self._subscriptions.append(subscription)
            if subject in api.READ_SUBJECTS:
                continue  # never paused: reads have their own budget
            self._pausable.append(subscription)
            if self._paused:
                await subscription.pause()
        log.info("serving requests", extra={"subjects": sorted(routes), "queue": api.QUEUE_GROUP})
        return True

    def cut_off(self) -> None:
        """End the work for every request now: waiting ones are answered with
        their failure reply, running ones see their deadline pass."""
        if self._cut_off:
            return
        self._cut_off = True
        self._intake_scope.cancel()
        self._read_intake_scope.cancel()
        for deadline in list(self._deadlines):
            deadline.cut_off()

    async def serve(self, stopping: anyio.Event, grace: float) -> None:
        """Handle requests until ``stopping``; then drain, let handlers finish
        within ``grace`` seconds, and cut off what is left."""
        async with anyio.create_task_group() as helpers:
            helpers.start_soon(self._regulate_intake)
            helpers.start_soon(self._answer_refusals)
            async with anyio.create_task_group() as work:
                work.start_soon(self._dispatch)
                await stopping.wait()
                started = time.monotonic()
                self._stopping = True
                self._intake_changed.set()
                async with self._intake_lock:
                    await drain_all(self._subscriptions)
                self._send.close()
                self._send_read.close()
                with anyio.move_on_after(grace - (time.monotonic() - started)):
                    await self._done.wait()
                cut_off = not self._done.is_set()
                if cut_off:
                    log.warning(
                        "shutdown grace expired; cutting off requests",
                        extra={"backlog": self._waiting, "in_flight": len(self._deadlines)},
                    )
                    self.cut_off()
                    with anyio.move_on_after(CUT_OFF_SECONDS):
                        await self._done.wait()
                work.cancel_scope.cancel()
            self._refuse.close()
        log.info(
            "stopped serving requests",
            extra={"drain_seconds": round(time.monotonic() - started, 3), "cut_off": cut_off},
        )

    # --- intake (runs on the asyncio side: never blocks) -------------------

    def _deliver(self, request: IncomingRequest) -> None:
        deadline = request_deadline(
            request.headers, request.received_at, request.received_wall, self._send_timeout
        )
        if request.subject in api.READ_SUBJECTS:
            self._deliver_read(request, deadline)
            return
        if self._cut_off:
            self._refuse.send_nowait((request, _failure_for(request.subject)))
            return
        if self._waiting >= 2 * self._max_backlog:
            self._shed(request, _shed_reply_for(request.subject))
            return
        try:
            self._send.send_nowait(_Waiting(request, deadline))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._refuse.send_nowait((request, _failure_for(request.subject)))
            return
        self._deadlines.add(deadline)
        self._waiting += 1
        REQUEST_BACKLOG.set(self._waiting)
        if self._waiting >= self._max_backlog and not self._paused:
            self._intake_changed.set()

    def _deliver_read(self, request: IncomingRequest, deadline: Deadline) -> None:
        if self._cut_off:
            self._refuse.send_nowait((request, api.ERR_INTERNAL))
            return
        if self._reads >= 2 * self._max_reads:
            self._shed(request, api.ERR_OVERLOADED)
            return
        try:
            self._send_read.send_nowait(_Waiting(request, deadline))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._refuse.send_nowait((request, api.ERR_INTERNAL))
            return
        self._deadlines.add(deadline)
        self._reads += 1

    def _shed(self, request: IncomingRequest, error: str) -> None:
        """Answer at once, unhandled, because this replica is too busy."""
        REQUESTS_SHED.labels(request.subject).inc()
        self._refuse.send_nowait((request, error))
        self._shed_unlogged += 1
        now = time.monotonic()
        if now - self._shed_logged_at >= SHED_LOG_INTERVAL:
            log.warning(
                "overloaded; shedding requests",
                extra={
                    "subject": request.subject,
                    "shed": self._shed_unlogged,
                    "reads": self._reads,
                    "max_reads_in_flight": self._max_reads,
                    "backlog": self._waiting,
                },
            )
            self._shed_logged_at = now
            self._shed_unlogged = 0

    async def _regulate_intake(self) -> None:
        """Pause the subscriptions while the backlog is full; resume at half."""
        while not self._stopping:
            await self._intake_changed.wait()
            self._intake_changed = anyio.Event()
            async with self._intake_lock:
                if self._stopping:
                    return
                await self._pause_or_resume()

    async def _pause_or_resume(self) -> None:
        if not self._paused and self._waiting >= self._max_backlog:
            self._paused = True
            REQUEST_INTAKE_PAUSED.set(1)
            log.warning(
                "request backlog full; pausing intake (other replicas take the requests)",
                extra={"backlog": self._waiting, "max_backlog": self._max_backlog},
            )
            for subscription in self._pausable:
                await subscription.pause()
        elif self._paused and self._waiting <= self._max_backlog // 2:
            try:
                for subscription in self._pausable:
                    await subscription.resume()
            except Exception as exc:
                log.warning("resuming intake failed; trying again", extra={"error": repr(exc)})
                await anyio.sleep(RESUME_RETRY_SECONDS)
                self._intake_changed.set()
                return
            self._paused = False
            REQUEST_INTAKE_PAUSED.set(0)
            log.info("request backlog drained; intake resumed", extra={"backlog": self._waiting})

    async def _answer_refusals(self) -> None:
        async with self._refusals:
            async for request, failure in self._refusals:
                error = error_reply(failure)
                await _respond(request, error)
                self._count(request.subject, 0, error)

    # --- handling ------------------------------------------------------------

    async def _dispatch(self) -> None:
        limiter = anyio.CapacityLimiter(self._max_in_flight or math.inf)
        holding: _Waiting | None = None
        try:
            async with anyio.create_task_group() as handlers:
                handlers.start_soon(self._dispatch_reads, handlers)
                with self._intake_scope:
                    async for waiting in self._receive:
                        holding = waiting
                        await limiter.acquire_on_behalf_of(waiting)
                        holding = None
                        self._taken(waiting)
                        handlers.start_soon(
                            self._handle, waiting, partial(limiter.release_on_behalf_of, waiting)
                        )
                # Cut off: what still waits is answered, never handled.
                if holding is not None:
                    self._taken(holding)
                    self._refuse_waiting(holding)
                while True:
                    try:
                        waiting = self._receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    self._taken(waiting)
                    self._refuse_waiting(waiting)
        finally:
            self._receive.close()
            self._done.set()

    async def _dispatch_reads(self, handlers: anyio.abc.TaskGroup) -> None:
        """Start reads, at most ``max_reads_in_flight`` at once; the rest wait
        (``_deliver_read`` sheds what would wait beyond as many again)."""
        limiter = anyio.CapacityLimiter(self._max_reads)
        holding: _Waiting | None = None
        try:
            with self._read_intake_scope:
                async for waiting in self._receive_read:
                    holding = waiting
                    await limiter.acquire_on_behalf_of(waiting)
                    holding = None
                    handlers.start_soon(
                        self._handle, waiting, partial(self._read_finished, limiter, waiting)
                    )
            # Cut off: what still waits is answered, never handled.
            if holding is not None:
                self._reads -= 1
                self._refuse_waiting(holding)
            while True:
                try:
                    waiting = self._receive_read.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
                self._reads -= 1
                self._refuse_waiting(waiting)
        finally:
            self._receive_read.close()

    def _read_finished(self, limiter: anyio.CapacityLimiter, waiting: _Waiting) -> None:
        limiter.release_on_behalf_of(waiting)
        self._reads -= 1

    def _taken(self, waiting: _Waiting) -> None:
        self._waiting -= 1
        REQUEST_BACKLOG.set(self._waiting)
        if self._paused and self._waiting <= self._max_backlog // 2:
            self._intake_changed.set()

    def _refuse_waiting(self, waiting: _Waiting) -> None:
        self._deadlines.discard(waiting.deadline)
        self._refuse.send_nowait((waiting.request, _failure_for(waiting.request.subject)))

    async def _handle(self, waiting: _Waiting, release: Callable[[], None]) -> None:
        request, deadline = waiting.request, waiting.deadline
        started = time.perf_counter_ns()
        REQUESTS_IN_FLIGHT.inc()
        try:
            with tracing.server_span(request.subject, request.headers) as span:
                try:
                    reply = await self._routes[request.subject](
                        request.data, deadline, request.headers
                    )
                except Exception:
                    # Never let internal exception text reach a caller.
                    log.exception("handler failed", extra={"subject": request.subject})
                    reply = error_reply(api.ERR_INTERNAL)
                error = reply if isinstance(reply, api.ErrorReply) else None
                if error is not None:
                    tracing.set_error(span, error.error)
                await _respond(request, reply)
            self._count(request.subject, time.perf_counter_ns() - started, error)
        finally:
            self._deadlines.discard(deadline)
            REQUESTS_IN_FLIGHT.dec()
            release()

    def _count(self, subject: str, elapsed_ns: int, error: api.ErrorReply | None) -> None:
        REQUESTS.labels(subject, _outcome(error)).inc()
        REQUEST_SECONDS.labels(subject).observe(elapsed_ns / 1e9)
        if self._stats is not None:
            self._stats.record(subject, elapsed_ns, None if error is None else error.error)


async def _respond(request: IncomingRequest, reply: Reply) -> None:
    headers = error_headers(reply) if isinstance(reply, api.ErrorReply) else {}
    headers |= reply_headers(reply)
    try:
        with anyio.fail_after(REPLY_TIMEOUT):
            await request.respond(encode_reply(reply), headers or None)
    except Exception as exc:
        log.warning("reply not sent", extra={"subject": request.subject, "error": repr(exc)})


def _failure_for(subject: str) -> str:
    """The reply to a request that is answered without being handled: for a
    send, "not sent" (``email delivery failed``, safe to retry); for a query,
    ``internal error``."""
    return api.ERR_DELIVERY_FAILED if subject == api.SEND_EMAIL_SUBJECT else api.ERR_INTERNAL


def _shed_reply_for(subject: str) -> str:
    """The reply to a request shed because this replica is too busy: a send
    keeps "not sent" (``email delivery failed``, safe to retry); anything
    else is ``overloaded``, never a store failure."""
    return api.ERR_DELIVERY_FAILED if subject == api.SEND_EMAIL_SUBJECT else api.ERR_OVERLOADED


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


def bounded_by_deadline(handler: Callable[[bytes], Awaitable[Reply]], failure: str) -> Handler:
    """A handler without deadlines of its own (a query: safe to stop
    anywhere), ended at the request's deadline with ``failure``."""

    async def handle(data: bytes, deadline: Deadline, headers: Mapping[str, str]) -> Reply:
        with deadline.scope():
            return await handler(data)
        log.warning(
            "request cut off at its deadline",
            extra={"handler": type(handler).__name__, "answer": failure},
        )
        return error_reply(failure)

    return handle


def _outcome(error: api.ErrorReply | None) -> str:
    """A metric label: ``ok`` or a contract error string (a small fixed set)."""
    if error is None:
        return "ok"
    return error.error if error.error in api.CONTRACT_ERRORS else "other error"
