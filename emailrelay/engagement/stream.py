"""Publishing outcomes to the ``EMAIL_EVENTS`` stream (``EVENTS_STREAM_ENABLED=true``).

::

    send path ── provider accepted ──> SentEvents.sent ──> publish (bounded wait)
                                            │ failed: the pending writes publish it later
    SQS poller ── SES event applied ──> EventHandler ──> EventPublisher.publish
                                            │ failed: the SQS message stays for redelivery

Every event carries its id (:mod:`.outcomes`) as ``Nats-Msg-Id``, so the
stream keeps one copy of each event however often it is published within its
duplicate window (``EVENTS_DUPLICATE_WINDOW``): a publish whose
acknowledgement was lost, an SQS redelivery, two replicas racing on one SES
event. That is what makes "publish again when unsure" safe everywhere here.

JetStream calls cross into nats-py in :mod:`emailrelay.bridge.nats` only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from emailrelay import api
from emailrelay.bridge.nats import NoStreamAnswered, StreamSpec
from emailrelay.deadline import Deadline
from emailrelay.engagement.outcomes import sent_event
from emailrelay.metrics import STREAM_EVENT_PUBLISH_FAILURES, STREAM_EVENTS_PUBLISHED
from emailrelay.store.kv import StoreError

log = logging.getLogger(__name__)

SENT_EVENT_WAIT = 1.0
"""Seconds a send waits for the stream to acknowledge its ``sent`` event
(a healthy stream answers in milliseconds) before leaving it to the pending
writes and replying: the reply is never held up longer for an event."""


class StreamHost(Protocol):
    """Where the stream lives (:class:`emailrelay.bridge.nats.NatsConnection`)."""

    async def stream_exists(self, name: str) -> bool: ...
    async def create_stream(self, spec: StreamSpec) -> None: ...
    async def publish_to_stream(self, subject: str, data: bytes, msg_id: str) -> bool: ...


def events_stream_spec(
    replicas: int, max_age: float, max_bytes: int, duplicate_window: float
) -> StreamSpec:
    """``EMAIL_EVENTS`` as the relay creates it (``KV_REPLICAS``, ``EVENTS_*``)."""
    return StreamSpec(
        name=api.EVENTS_STREAM,
        subjects=(api.EVENTS_SUBJECTS,),
        replicas=replicas,
        max_age=max_age,
        max_bytes=max_bytes,
        duplicate_window=duplicate_window,
    )


async def open_events_stream(host: StreamHost, spec: StreamSpec, auto_create: bool) -> bool:
    """Whether the stream is there, created first when missing and
    ``auto_create``; :class:`StoreError` when JetStream cannot say."""
    if await host.stream_exists(spec.name):
        return True
    if not auto_create:
        return False
    try:
        await host.create_stream(spec)
    except StoreError:
        # Another replica may have created it first (with its own settings).
        if not await host.stream_exists(spec.name):
            raise
        return True
    log.info("created JetStream stream", extra={"stream": spec.name})
    return True


class EventPublisher:
    """Publishes :class:`~emailrelay.api.EmailEvent` s to ``EMAIL_EVENTS``;
    counts them; raises :class:`StoreError` for one that is not stored.

    With ``recreate`` (``KV_AUTO_CREATE=true``), a publish no stream answered
    makes it create the stream (at most once per ``retry_interval``) and
    publish again: the stream may have been deleted while the relay ran, or
    JetStream may not have answered at start, as buckets are re-created
    (emailrelay.store.buckets)."""

    def __init__(
        self, host: StreamHost, recreate: StreamSpec | None = None, retry_interval: float = 1.0
    ) -> None:
        self._host = host
        self._recreate = recreate
        self._retry_interval = retry_interval
        self._lock = anyio.Lock()
        self._tried_at = -math.inf

    async def publish(self, event: api.EmailEvent) -> None:
        try:
            try:
                duplicate = await self._publish(event)
            except NoStreamAnswered:
                if not await self._recreate_stream():
                    raise
                duplicate = await self._publish(event)
        except StoreError:
            STREAM_EVENT_PUBLISH_FAILURES.labels(event.type).inc()
            raise
        STREAM_EVENTS_PUBLISHED.labels(event.type, "duplicate" if duplicate else "stored").inc()

    async def _publish(self, event: api.EmailEvent) -> bool:
        return await self._host.publish_to_stream(
            api.events_subject(event.type), event.to_json(), event.event_id
        )

    async def _recreate_stream(self) -> bool:
        """Create the stream if allowed and not tried within the interval;
        whether it is there to publish again."""
        if self._recreate is None:
            return False
        async with self._lock:
            if anyio.current_time() - self._tried_at < self._retry_interval:
                return False
            self._tried_at = anyio.current_time()
            try:
                created = await open_events_stream(self._host, self._recreate, auto_create=True)
            except StoreError as exc:
                log.warning(
                    "events stream not answering and could not be created",
                    extra={"stream": self._recreate.name, "error": str(exc)},
                )
                return False
            return created


class PendingPublishes(Protocol):
    """:meth:`emailrelay.store.pending.PendingTrackingWrites.add_publish`."""

    def add_publish(self, key: str, publish: Callable[[], Awaitable[None]], size: int) -> bool: ...


class SentEvents:
    """The send path's ``sent`` events: published while the reply waits at
    most :data:`SENT_EVENT_WAIT` (and never past the request's deadline),
    else handed to the pending writes. Never raises: the email is out."""

    def __init__(
        self, publisher: EventPublisher, pending: PendingPublishes, wait: float = SENT_EVENT_WAIT
    ) -> None:
        self._publisher = publisher
        self._pending = pending
        self._wait = wait

    async def sent(self, record: api.TrackingRecord, deadline: Deadline) -> None:
        event = sent_event(record)
        wait = min(self._wait, deadline.remaining())
        error = "no time left before the request's deadline"
        if wait > 0:
            error = f"no acknowledgement within {wait:g}s"
            # Shielded: a request cut off at shutdown still gets its bounded try.
            with anyio.CancelScope(deadline=anyio.current_time() + wait, shield=True):
                try:
                    await self._publisher.publish(event)
                    return
                except Exception as exc:  # not only StoreError: the email is out either way
                    error = repr(exc)
        body = event.to_json()

        async def publish_later() -> None:
            await self._publisher.publish(event)

        context = {"email_id": record.email_id, "event_id": event.event_id, "error": error}
        if self._pending.add_publish(event.event_id, publish_later, len(body)):
            log.warning("sent event pending; published once the stream answers", extra=context)
        else:
            log.error("sent event dropped: the pending writes are full", extra=context)
