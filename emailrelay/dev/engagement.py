"""Engagement events on a laptop: the dev stack's stand-in for SES, SNS and SQS.

::

    SMTP capture ── every captured message ──> Delivery event ─┐
    emailrelay dev event open|click|... ──> NATS request on    │
        DEV_EVENTS_SUBJECT (served only by emailrelay dev) ────┤
                                                               v
                      DevEventQueue (SQS semantics, in memory)
                                                               │
            the production poller: parse_message, apply_event, retry, delete

Events are SES event records in SNS envelopes (:mod:`.sesevents`), read by the
same poller, parser and applier as SQS events in production, so status and
analytics move exactly as they would there. ``emailrelay serve`` never
subscribes to :data:`DEV_EVENTS_SUBJECT`: it exists only while a dev stack runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import trio

from emailrelay.bridge.nats import IncomingRequest, NatsConnection
from emailrelay.dev.capture import CapturedMessage
from emailrelay.dev.eventqueue import DevEventQueue
from emailrelay.dev.sesevents import DevEvent, ses_event, sns_notification
from emailrelay.engagement.handler import RecordUpdater, StreamPublisher
from emailrelay.engagement.poller import PollerSettings, poll_engagement_events

log = logging.getLogger(__name__)

DEV_EVENTS_SUBJECT = "emailrelay.dev.ses-events"
"""Request: an SQS message body (an SNS notification carrying an SES event).
Reply: ``{"message_id": str, "handled": bool}``, ``handled`` once the poller
deleted it (applied, a duplicate, or skipped) within :data:`HANDLED_WAIT`."""

DELIVERY_DELAY = 0.2
"""Seconds between capture and the Delivery event (SES takes longer; the relay
stores its tracking record right after the SMTP reply, so usually first)."""
HANDLED_WAIT = 5.0
VISIBILITY_TIMEOUT = 1.0


class DevEngagement:
    """Feeds the dev stack's event queue and runs the poller over it."""

    def __init__(self, visibility_timeout: float = VISIBILITY_TIMEOUT) -> None:
        self.queue = DevEventQueue(visibility_timeout)
        self._captured_in, self._captured_out = trio.open_memory_channel[Path](math.inf)
        self._token = trio.lowlevel.current_trio_token()

    def on_captured(self, message: CapturedMessage) -> None:
        """Give a captured message its Delivery event. Called on the SMTP
        capture's own thread: hands the file over to trio without waiting."""
        with contextlib.suppress(trio.RunFinishedError):  # stopping
            self._token.run_sync_soon(self._hand_over, message.path)

    def _hand_over(self, path: Path) -> None:
        # Runs inside trio's loop: an exception here would crash the whole run.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._captured_in.send_nowait(path)  # unbounded: never WouldBlock

    async def run(
        self,
        nats: NatsConnection,
        store: RecordUpdater,
        poller: PollerSettings,
        *,
        events: StreamPublisher | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled; ``started`` once :data:`DEV_EVENTS_SUBJECT` is subscribed.
        ``events``: the ``EMAIL_EVENTS`` publisher, as ``serve`` gives its poller."""
        requests_in, requests_out = anyio.create_memory_object_stream[IncomingRequest](64)
        subscription = await nats.subscribe_requests(DEV_EVENTS_SUBJECT, "", requests_in)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._deliver_captured)
                tg.start_soon(
                    partial(poll_engagement_events, self.queue, store, poller, events=events)
                )
                tg.start_soon(self._accept_requests, requests_out, tg)
                task_status.started()
        finally:
            await subscription.drain()

    async def _deliver_captured(self) -> None:
        async for path in self._captured_out:
            try:
                raw = await anyio.Path(path).read_bytes()
            except OSError as exc:
                log.warning(
                    "captured message unreadable; no Delivery event", extra={"error": str(exc)}
                )
                continue
            # Stamped when it becomes visible, as SES stamps a delivery after the send.
            at = datetime.now(UTC) + timedelta(seconds=DELIVERY_DELAY)
            event = ses_event(DevEvent.DELIVERY, raw, now=at)
            self.queue.send(sns_notification(event, now=at), DELIVERY_DELAY)

    async def _accept_requests(
        self,
        requests: anyio.abc.ObjectReceiveStream[IncomingRequest],
        tg: anyio.abc.TaskGroup,
    ) -> None:
        async with requests:
            async for request in requests:
                tg.start_soon(self._accept, request)

    async def _accept(self, request: IncomingRequest) -> None:
        message_id = self.queue.send(request.data.decode("utf-8", errors="replace"))
        handled = False
        with anyio.move_on_after(HANDLED_WAIT):
            await self.queue.wait_deleted(message_id)
            handled = True
        reply = {"message_id": message_id, "handled": handled}
        try:
            await request.respond(json.dumps(reply).encode())
        except Exception as exc:  # the requester is gone; the event stays queued
            log.warning("dev event reply not sent", extra={"error": repr(exc)})
