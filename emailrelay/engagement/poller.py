"""The SQS poller: long-poll, apply events concurrently (bounded), delete in batches.

::

    receive loop ── up to 10 messages per long poll ──> one handler task each
        (waits for a free slot first)                     (at most ``concurrency``)
                                                               │ done: delete
    delete loop  <── DeleteMessageBatch, up to 10 per call ────┘

A message is deleted when its event was applied, was already there, or can
never apply (malformed, unknown type, no tracking header, record still missing
after ``max_receives`` receives). Anything else (a store error, a record that
does not exist yet) stays in the queue and comes back after its visibility
timeout; applying an event twice changes nothing, so redelivery is safe.

With the events stream on (``EVENTS_STREAM_ENABLED=true``), an applied event
is also published to ``EMAIL_EVENTS`` before its message is deleted; a publish
that fails keeps the message too (the stream drops the copy a redelivery
publishes again, emailrelay.engagement.stream).

With the suppression list on (``SUPPRESSION_ENABLED=true``), a Permanent
bounce or a complaint first adds the recipients it names
(emailrelay.engagement.suppression), whether or not the message carries a
tracking header; an add that fails keeps the message for redelivery too.

Receive failures back off exponentially (:class:`emailrelay.supervision.Backoff`:
1 s, then 2 s, each gap between half and all of that); the third failure in a
row raises :class:`PollerAborted`, which shuts the service down.
:class:`emailrelay.engagement.handler.EventHandler` decides what each message
does to the store; this module is only the loop.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from emailrelay.engagement.handler import (
    DELETING,
    EventHandler,
    Outcome,
    RecordUpdater,
    StreamPublisher,
    SuppressionAdder,
)
from emailrelay.metrics import SQS_EVENTS, SQS_RECEIVE_ERRORS
from emailrelay.sqs import SqsError, SqsMessage
from emailrelay.supervision import Backoff, start_bounded

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16


class PollerAborted(Exception):
    """Receiving failed too many times in a row: the service must stop."""


class MessageQueue(Protocol):
    """The part of :class:`emailrelay.sqs.SqsClient` the poller uses."""

    async def receive_messages(
        self, max_messages: int = 10, wait_seconds: int = 20
    ) -> list[SqsMessage]: ...

    async def delete_messages(self, messages: Iterable[SqsMessage]) -> list[str]: ...


@dataclass(frozen=True)
class PollerSettings:
    max_receives: int = 5
    """A message whose record is missing is deleted once received more often than this."""
    concurrency: int = DEFAULT_CONCURRENCY
    wait_seconds: int = 20
    max_messages: int = 10
    failures_before_abort: int = 3
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    summary_interval: float = 60.0
    delete_linger: float = 0.1
    """Seconds a delete batch waits to fill up to ten messages."""


@dataclass
class _Summary:
    """Counts since the last summary log line."""

    outcomes: Counter[str] = field(default_factory=Counter)
    receive_errors: int = 0
    delete_failures: int = 0

    def take(self) -> dict[str, int]:
        counts = dict(self.outcomes)
        counts["receive_errors"] = self.receive_errors
        counts["delete_failures"] = self.delete_failures
        self.outcomes.clear()
        self.receive_errors = self.delete_failures = 0
        return counts


async def poll_engagement_events(
    queue: MessageQueue,
    store: RecordUpdater,
    settings: PollerSettings = PollerSettings(),
    *,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    backoff: Backoff | None = None,
    suppressions: SuppressionAdder | None = None,
    source: str = "SQS",
    events: StreamPublisher | None = None,
) -> None:
    """Run until cancelled; raise :class:`PollerAborted` after
    ``failures_before_abort`` consecutive receive failures. ``source``: what
    the start-up log line says is polled; ``events``: the ``EMAIL_EVENTS``
    publisher (``EVENTS_STREAM_ENABLED=true``)."""
    handler = EventHandler(store, settings.max_receives, suppressions=suppressions, events=events)
    summary = _Summary()
    if backoff is None:
        backoff = Backoff(settings.backoff_initial, settings.backoff_max)
    limiter = anyio.CapacityLimiter(settings.concurrency)
    done_send, done_receive = anyio.create_memory_object_stream[SqsMessage](math.inf)
    log.info("polling %s for SES events", source, extra={"concurrency": settings.concurrency})
    aborted: PollerAborted | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_delete_done, queue, done_receive, summary, settings.delete_linger)
        tg.start_soon(_log_summaries, summary, settings.summary_interval)
        async with done_send:
            try:
                await _receive_loop(
                    queue, handler, settings, limiter, done_send, summary, tg, sleep, backoff
                )
            except PollerAborted as exc:
                # Raised bare below, not wrapped in the task group's ExceptionGroup.
                aborted = exc
                tg.cancel_scope.cancel()
    if aborted is not None:
        raise aborted


async def _receive_loop(
    queue: MessageQueue,
    handler: EventHandler,
    settings: PollerSettings,
    limiter: anyio.CapacityLimiter,
    done: MemoryObjectSendStream[SqsMessage],
    summary: _Summary,
    tg: TaskGroup,
    sleep: Callable[[float], Awaitable[None]],
    backoff: Backoff,
) -> None:
    failures = 0
    while True:
        try:
            messages = await queue.receive_messages(
                max_messages=settings.max_messages, wait_seconds=settings.wait_seconds
            )
        except SqsError as exc:
            failures += 1
            summary.receive_errors += 1
            SQS_RECEIVE_ERRORS.inc()
            if failures >= settings.failures_before_abort:
                log.error(
                    "SQS receive failed %d times in a row; stopping the service",
                    failures,
                    extra={"failures": failures, "error": str(exc)},
                )
                raise PollerAborted(f"SQS receive failed {failures} times in a row") from exc
            gap = backoff.delay(failures)
            log.warning(
                "SQS receive failed; retrying",
                extra={
                    "failures": failures,
                    "retry_in_seconds": round(gap, 3),
                    "nominal_seconds": backoff.nominal(failures),
                    "error": str(exc),
                },
            )
            await sleep(gap)
            continue
        failures = 0
        for message in messages:
            # A slot before each start, so at most one received batch waits.
            await start_bounded(
                tg,
                limiter,
                functools.partial(_handle_one, handler, done=done, summary=summary),
                message,
            )


async def _handle_one(
    handler: EventHandler,
    message: SqsMessage,
    *,
    done: MemoryObjectSendStream[SqsMessage],
    summary: _Summary,
) -> None:
    try:
        label, outcome = await handler.handle(message)
    except Exception:
        # A bug must not stop the poller; the message comes back (and ends in the DLQ).
        log.exception(
            "handling an SQS message failed", extra={"sqs_message_id": message.message_id}
        )
        label, outcome = "other", Outcome.RETRY
    SQS_EVENTS.labels(label, outcome).inc()
    summary.outcomes[outcome] += 1
    if outcome in DELETING:
        done.send_nowait(message)


async def _delete_done(
    queue: MessageQueue,
    done: MemoryObjectReceiveStream[SqsMessage],
    summary: _Summary,
    linger: float,
) -> None:
    """Delete finished messages, up to ten per call. After the first of a batch,
    wait up to ``linger`` seconds for more: SQS bills per request, and with few
    messages in flight a batch would otherwise hold one message."""
    async with done:
        async for first in done:
            batch = [first]
            with anyio.move_on_after(linger):
                while len(batch) < 10:
                    try:
                        batch.append(await done.receive())
                    except anyio.EndOfStream:
                        break
            try:
                failed = await queue.delete_messages(batch)
            except SqsError as exc:
                # They come back after the visibility timeout and are applied again: harmless.
                summary.delete_failures += len(batch)
                log.warning("deleting SQS messages failed", extra={"error": str(exc)})
                continue
            summary.delete_failures += len(failed)


async def _log_summaries(summary: _Summary, interval: float) -> None:
    last = time.monotonic()
    while True:
        await anyio.sleep(interval)
        counts = summary.take()
        elapsed = time.monotonic() - last
        last = time.monotonic()
        if any(counts.values()):
            log.info("SES events in the last %.0fs", elapsed, extra={"events": counts})
