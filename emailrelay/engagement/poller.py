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

With the suppression list on (``SUPPRESSION_ENABLED=true``), a Permanent
bounce or a complaint first adds the recipients it names
(emailrelay.engagement.suppression), whether or not the message carries a
tracking header; an add that fails keeps the message for redelivery too.

Receive failures back off exponentially (1 s, 2 s, 4 s ... capped at 30 s;
each gap between half and all of that); the third failure in a row raises
:class:`PollerAborted`, which shuts the service down.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from emailrelay.addresses import redact
from emailrelay.api import TrackingRecord
from emailrelay.engagement.events import EngagementEvent, Skipped, apply_event, parse_message
from emailrelay.engagement.suppression import suppressions_from_message
from emailrelay.metrics import (
    SQS_EVENT_LAG_SECONDS,
    SQS_EVENTS,
    SQS_RECEIVE_ERRORS,
    SUPPRESSIONS_ADDED,
)
from emailrelay.sqs import SqsError, SqsMessage
from emailrelay.store.kv import StoreError
from emailrelay.store.suppressions import Suppression

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


class SuppressionAdder(Protocol):
    """The part of :class:`emailrelay.store.suppressions.SuppressionStore` the poller uses."""

    async def add(self, suppression: Suppression) -> bool: ...


class RecordUpdater(Protocol):
    """The part of :class:`emailrelay.store.tracking.TrackingStore` the poller uses."""

    async def update_record(
        self, email_id: str, change: Callable[[TrackingRecord], bool]
    ) -> TrackingRecord | None: ...


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
class ReceiveBackoff:
    """Gaps after consecutive receive failures: nominal ``initial * 2**(n-1)``,
    capped at ``maximum``, jittered into ``[nominal/2, nominal]`` so replicas
    do not retry in step yet never retry sooner than half the nominal delay."""

    initial: float = 1.0
    maximum: float = 30.0
    uniform: Callable[[float, float], float] = random.uniform

    def nominal(self, failures: int) -> float:
        return min(self.maximum, self.initial * 2.0 ** max(0, failures - 1))

    def delay(self, failures: int) -> float:
        nominal = self.nominal(failures)
        jittered = float(self.uniform(nominal / 2, nominal))
        return min(nominal, max(nominal / 2, jittered))


class Outcome:
    """Metric outcomes (the ``outcome`` label of ``emailrelay_sqs_events``)."""

    APPLIED = "applied"  # the record changed; deleted
    DUPLICATE = "duplicate"  # nothing to change (replay, or a later first-wins event); deleted
    SKIPPED = "skipped"  # can never apply (malformed, unknown type, no header); deleted
    DELETED = "deleted"  # the record never appeared within max_receives; deleted
    RETRY = "retry"  # left in the queue for redelivery


_DELETING = {Outcome.APPLIED, Outcome.DUPLICATE, Outcome.SKIPPED, Outcome.DELETED}


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


class EventHandler:
    """Applies one SQS message to the store; returns the outcome (never raises
    for a bad message or a failing store)."""

    def __init__(
        self,
        store: RecordUpdater,
        max_receives: int,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        suppressions: SuppressionAdder | None = None,
    ) -> None:
        self._store = store
        self._max_receives = max_receives
        self._now = now
        self._suppressions = suppressions

    async def handle(self, message: SqsMessage) -> tuple[str, str]:
        """(event type label, outcome) for ``message``."""
        suppressed = await self._suppress(message)
        label, outcome = await self._track(message)
        if not suppressed and outcome in _DELETING:
            return label, Outcome.RETRY
        return label, outcome

    async def _suppress(self, message: SqsMessage) -> bool:
        """Add the recipients the event suppresses; ``False`` when an add
        failed (the message must come back)."""
        if self._suppressions is None:
            return True
        for suppression in suppressions_from_message(message.body, self._now()):
            try:
                added = await self._suppressions.add(suppression)
            except StoreError as exc:
                log.warning(
                    "event left for redelivery: the suppression list could not be written",
                    extra={"sqs_message_id": message.message_id, "error": repr(exc)},
                )
                return False
            if added:
                SUPPRESSIONS_ADDED.labels(suppression.reason.value).inc()
                log.info(
                    "recipient suppressed",
                    extra={
                        "to": redact(suppression.address),
                        "reason": suppression.reason.value,
                        "sqs_message_id": message.message_id,
                    },
                )
        return True

    async def _track(self, message: SqsMessage) -> tuple[str, str]:
        parsed = parse_message(message.body, message.message_id)
        if isinstance(parsed, Skipped):
            log.info(
                "SQS message skipped: %s",
                parsed.reason,
                extra={"sqs_message_id": message.message_id, "reason": parsed.label},
            )
            return parsed.label, Outcome.SKIPPED
        outcome = await self._apply(parsed, message)
        log.debug(
            "SES event %s",
            outcome,
            extra={
                "email_id": parsed.email_id,
                "event_type": parsed.kind.value,
                "sqs_message_id": message.message_id,
                "outcome": outcome,
            },
        )
        return parsed.kind.value, outcome

    async def _apply(self, event: EngagementEvent, message: SqsMessage) -> str:
        now = self._now()
        if event.published_at is not None:
            SQS_EVENT_LAG_SECONDS.observe(max(0.0, (now - event.published_at).total_seconds()))
        context = {
            "email_id": event.email_id,
            "event_type": event.kind.value,
            "sqs_message_id": message.message_id,
            "receive_count": message.receive_count,
        }
        changed = False

        def change(record: TrackingRecord) -> bool:
            nonlocal changed
            # Called again on a fresh read after a revision conflict.
            changed = apply_event(record, event, now)
            return changed

        try:
            stored = await self._store.update_record(event.email_id, change)
        except StoreError as exc:
            log.warning(
                "event left for redelivery: the store failed",
                extra={**context, "error": repr(exc)},
            )
            return Outcome.RETRY
        if stored is None:
            if message.receive_count <= self._max_receives:
                log.info("event left for redelivery: no such record yet", extra=context)
                return Outcome.RETRY
            log.warning(
                "event dropped: no record for its email after %d receives",
                message.receive_count,
                extra=context,
            )
            return Outcome.DELETED
        return Outcome.APPLIED if changed else Outcome.DUPLICATE


async def poll_engagement_events(
    queue: MessageQueue,
    store: RecordUpdater,
    settings: PollerSettings = PollerSettings(),
    *,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    backoff: ReceiveBackoff | None = None,
    suppressions: SuppressionAdder | None = None,
) -> None:
    """Run until cancelled; raise :class:`PollerAborted` after
    ``failures_before_abort`` consecutive receive failures."""
    handler = EventHandler(store, settings.max_receives, suppressions=suppressions)
    summary = _Summary()
    if backoff is None:
        backoff = ReceiveBackoff(settings.backoff_initial, settings.backoff_max)
    limiter = anyio.CapacityLimiter(settings.concurrency)
    done_send, done_receive = anyio.create_memory_object_stream[SqsMessage](math.inf)
    log.info("polling SQS for SES events", extra={"concurrency": settings.concurrency})
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
    backoff: ReceiveBackoff,
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
            # Take a slot before starting, so at most one received batch waits.
            await limiter.acquire_on_behalf_of(message)
            tg.start_soon(_handle_one, handler, message, limiter, done, summary)


async def _handle_one(
    handler: EventHandler,
    message: SqsMessage,
    limiter: anyio.CapacityLimiter,
    done: MemoryObjectSendStream[SqsMessage],
    summary: _Summary,
) -> None:
    try:
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
        if outcome in _DELETING:
            done.send_nowait(message)
    finally:
        limiter.release_on_behalf_of(message)


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
