"""What one SQS message does to the tracking store: parse it (pure,
:mod:`.events`), apply it to its record (pure, :func:`.events.apply_event`)
through the store's revision-checked update, and name the outcome, which
decides whether the poller (:mod:`.poller`) deletes the message. With the
suppression list on, the recipients a Permanent bounce or a complaint names
(pure, :mod:`.suppression`) are added first. With the events stream on, the
applied event is then published to ``EMAIL_EVENTS`` (:mod:`.stream`), and a
publish that fails keeps the message for redelivery, as a failed update does."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

from emailrelay.addresses import redact
from emailrelay.api import EmailEvent, TrackingRecord
from emailrelay.engagement.events import EngagementEvent, Skipped, apply_event, parse_message
from emailrelay.engagement.outcomes import ses_outcome
from emailrelay.engagement.suppression import suppressions_from_message
from emailrelay.metrics import SQS_EVENT_LAG_SECONDS, SUPPRESSIONS_ADDED
from emailrelay.sqs import SqsMessage
from emailrelay.store.kv import StoreError
from emailrelay.store.suppressions import Suppression

log = logging.getLogger(__name__)


class RecordUpdater(Protocol):
    """The part of :class:`emailrelay.store.tracking.TrackingStore` the poller uses."""

    async def update_record(
        self, email_id: str, change: Callable[[TrackingRecord], bool]
    ) -> TrackingRecord | None: ...


class SuppressionAdder(Protocol):
    """The part of :class:`emailrelay.store.suppressions.SuppressionStore` the poller uses."""

    async def add(self, suppression: Suppression) -> bool: ...


class StreamPublisher(Protocol):
    """:class:`emailrelay.engagement.stream.EventPublisher`: raises
    :class:`StoreError` for an event the stream did not store."""

    async def publish(self, event: EmailEvent) -> None: ...


class Outcome:
    """Metric outcomes (the ``outcome`` label of ``emailrelay_sqs_events``)."""

    APPLIED = "applied"  # the record changed; deleted
    DUPLICATE = "duplicate"  # nothing to change (replay, or a later first-wins event); deleted
    SKIPPED = "skipped"  # can never apply (malformed, unknown type, no header); deleted
    DELETED = "deleted"  # the record never appeared within max_receives; deleted
    RETRY = "retry"  # left in the queue for redelivery


DELETING = {Outcome.APPLIED, Outcome.DUPLICATE, Outcome.SKIPPED, Outcome.DELETED}


class EventHandler:
    """Applies one SQS message to the store; returns the outcome (never raises
    for a bad message or a failing store)."""

    def __init__(
        self,
        store: RecordUpdater,
        max_receives: int,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        suppressions: SuppressionAdder | None = None,
        events: StreamPublisher | None = None,
    ) -> None:
        self._store = store
        self._events = events
        self._max_receives = max_receives
        self._now = now
        self._suppressions = suppressions

    async def handle(self, message: SqsMessage) -> tuple[str, str]:
        """(event type label, outcome) for ``message``."""
        suppressed = await self._suppress(message)
        label, outcome = await self._track(message)
        if not suppressed and outcome in DELETING:
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
        if not await self._publish(stored, event, now, context):
            return Outcome.RETRY
        return Outcome.APPLIED if changed else Outcome.DUPLICATE

    async def _publish(
        self,
        record: TrackingRecord,
        event: EngagementEvent,
        now: datetime,
        context: Mapping[str, object],
    ) -> bool:
        """Publish the event to the stream (events stream on); ``False`` when
        that failed and the message must come back. Published whether or not
        the record changed: an earlier delivery may have updated the record
        and then failed to publish; the stream drops the copy when it did not."""
        if self._events is None:
            return True
        published = ses_outcome(record, event, now)
        if published is None:
            return True
        try:
            await self._events.publish(published)
        except StoreError as exc:
            log.warning(
                "event left for redelivery: the events stream did not store it",
                extra={**context, "error": repr(exc)},
            )
            return False
        return True
