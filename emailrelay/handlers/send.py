"""``lfx.email-service.send_email``: the effects of a decision.

What a request asks for is decided by the pure
:func:`emailrelay.handlers.send_decision.decide_send`; this handler carries
it out: the send, then the tracking writes, then the reply. ``NoSender`` and
``NoTracking`` stand for "sending is off" and "no KV store"."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import anyio

from emailrelay import api
from emailrelay.addresses import redact
from emailrelay.deadline import Deadline, DeadlinePassed
from emailrelay.handlers.replies import Reply, error_reply
from emailrelay.handlers.send_decision import (
    SKIPPED_REPLY,
    NewIds,
    Send,
    SendRules,
    Skip,
    decide_send,
)
from emailrelay.mail.errors import SendFailure
from emailrelay.mail.message import build_message
from emailrelay.store.kv import BucketMissing
from emailrelay.supervision import Backoff

__all__ = [
    "NoPending",
    "NoSender",
    "NoTracking",
    "PendingTracking",
    "SendEmailHandler",
    "SendRules",
    "Sender",
    "TrackingWriter",
]

log = logging.getLogger(__name__)


class Sender(Protocol):
    async def send(self, sender: str, recipient: str, message: bytes, deadline: Deadline) -> None:
        """Deliver or raise :class:`~emailrelay.mail.errors.SendFailure`;
        start nothing after ``deadline`` (raise
        :class:`~emailrelay.deadline.DeadlinePassed`)."""
        ...


class TrackingWriter(Protocol):
    async def create_record(self, record: api.TrackingRecord) -> None: ...
    async def append_to_group(self, group_id: str, email_id: str) -> None: ...


class PendingTracking(Protocol):
    def add(
        self, record: api.TrackingRecord, writer: TrackingWriter, *, record_stored: bool
    ) -> bool:
        """Finish these tracking writes later; ``False`` when they cannot be kept."""
        ...


class NoSender:
    """EMAIL_ENABLED=false: the decision skips every request before a send,
    so this is never asked; if it were, the caller hears "not sent"."""

    async def send(self, sender: str, recipient: str, message: bytes, deadline: Deadline) -> None:
        raise SendFailure("sending is disabled (EMAIL_ENABLED=false)")


class NoTracking:
    """No KV store (yet): sends are not recorded."""

    async def create_record(self, record: api.TrackingRecord) -> None:
        return None

    async def append_to_group(self, group_id: str, email_id: str) -> None:
        return None


class NoPending:
    """Nowhere to keep a failed tracking write: it counts as failed for good."""

    def add(
        self, record: api.TrackingRecord, writer: TrackingWriter, *, record_stored: bool
    ) -> bool:
        return False


class SendEmailHandler:
    def __init__(
        self,
        rules: SendRules,
        sender: Sender,
        tracking: TrackingWriter,
        tracking_deadline: float = 10.0,
        new_ids: Callable[[], NewIds] = NewIds.random,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_tracking_failure: Callable[[], None] = lambda: None,
        pending: PendingTracking | None = None,
        on_expired: Callable[[], None] = lambda: None,
    ) -> None:
        self._rules = rules
        self._sender = sender
        self._tracking = tracking
        self._tracking_deadline = tracking_deadline
        self._new_ids = new_ids
        self._now = now
        self._on_tracking_failure = on_tracking_failure
        self._pending = pending if pending is not None else NoPending()
        self._on_expired = on_expired

    def start_tracking(self, tracking: TrackingWriter) -> None:
        """Record sends from now on (the KV store became available after start)."""
        self._tracking = tracking

    async def __call__(self, data: bytes, deadline: Deadline | None = None) -> Reply:
        """One request; ``deadline`` is when its caller stops waiting (none:
        no limit of its own, the sender's ``SEND_TIMEOUT`` still applies)."""
        decision = decide_send(data, self._rules, self._new_ids(), self._now())
        if isinstance(decision, Skip):
            log.info(decision.reason, extra={"to": decision.to})
            return SKIPPED_REPLY
        if isinstance(decision, Send):
            return await self._send(decision, deadline or Deadline.never())
        return decision

    async def _send(self, decision: Send, deadline: Deadline) -> Reply:
        email = decision.email
        context = {
            "email_id": email.email_id,
            "group_id": email.group_id,
            "to": redact(email.recipient.address),
        }
        if deadline.expired:
            # The caller has left (or is about to): a message sent now would be
            # answered to nobody, and a caller that retries would send it twice.
            self._on_expired()
            log.info("deadline passed before sending; not sent", extra=context)
            return error_reply(api.ERR_DELIVERY_FAILED)
        try:
            await self._sender.send(
                email.sender.address, email.recipient.address, build_message(email), deadline
            )
        except DeadlinePassed as exc:
            self._on_expired()
            log.warning("email delivery failed", extra={**context, "reason": exc.reason})
            return error_reply(api.ERR_DELIVERY_FAILED)
        except SendFailure as exc:
            log.warning("email delivery failed", extra={**context, "reason": exc.reason})
            return error_reply(api.ERR_DELIVERY_FAILED)
        log.info("email sent", extra=context)

        # Without a store there is nothing to write and nothing to retry (a
        # deadline passing inside the retry loop would count a no-op as lost).
        if not isinstance(self._tracking, NoTracking):
            await self._write_tracking(self._tracking, decision.record, deadline)
        return api.SendEmailReply(email_id=email.email_id, group_id=email.group_id)

    async def _write_tracking(
        self, tracking: TrackingWriter, record: api.TrackingRecord, deadline: Deadline
    ) -> None:
        """Store the record, then index it, retrying a failing store while the
        request's time allows: until its deadline (``deadline.scope()`` also ends
        at once when the shutdown grace cuts requests off), ``tracking_deadline``
        at most. What is not stored by then is handed to the pending writes,
        which finish it once the store is back. Either way the email is out, so
        the caller gets its success (an error would invite a duplicate send)."""
        record_stored = False
        backoff = Backoff(initial=0.05, maximum=2.0)
        attempt = 0
        with deadline.scope(), anyio.move_on_after(self._tracking_deadline):
            while True:
                try:
                    if not record_stored:
                        await tracking.create_record(record)
                        record_stored = True
                    await tracking.append_to_group(record.group_id, record.email_id)
                    return
                except BucketMissing as exc:
                    # The bucket is gone and could not be opened again: waiting
                    # here would only slow the reply down.
                    log.warning(
                        "tracking write failed: KV bucket missing",
                        extra={"email_id": record.email_id, "error": str(exc)},
                    )
                    break
                except Exception as exc:
                    # Not only StoreError: once the email is out, no failure of
                    # the store (even an unexpected one) may turn into an error
                    # reply, which would invite a duplicate send.
                    log.warning(
                        "tracking write failed; retrying",
                        extra={"email_id": record.email_id, "error": repr(exc)},
                    )
                attempt += 1
                await backoff.sleep(attempt)
        if self._pending.add(record, tracking, record_stored=record_stored):
            log.warning(
                "tracking write pending; stored once the KV store answers",
                extra={"email_id": record.email_id, "group_id": record.group_id},
            )
            return
        self._on_tracking_failure()
        log.error(
            "tracking write failed for good; the email was sent",
            extra={"email_id": record.email_id, "group_id": record.group_id},
        )
