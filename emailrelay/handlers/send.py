"""``lfx.email-service.send_email``: the contract's checks, in its order, then
the send, then the tracking writes, then the reply."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import anyio

from emailrelay import api
from emailrelay.addresses import (
    Mailbox,
    domain_is_listed,
    domain_is_within,
    parse_mailbox,
    redact,
    strip_line_breaks,
)
from emailrelay.deadline import Deadline, DeadlinePassed
from emailrelay.handlers.replies import error_reply, parse_request, reply
from emailrelay.mail.errors import SendFailure
from emailrelay.mail.message import OutgoingEmail, build_message
from emailrelay.store.kv import BucketMissing

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


@dataclass(frozen=True)
class SendRules:
    """The parts of the configuration that decide what a send request may do."""

    email_enabled: bool
    default_from: Mailbox
    default_from_display_name: str
    allowed_from_domains: tuple[str, ...]
    allowed_reply_to_domains: tuple[str, ...]
    allowed_recipient_domains: tuple[str, ...]
    configuration_set: str | None = None


_SKIPPED = api.SendEmailReply(email_id="", group_id="")


class SendEmailHandler:
    def __init__(
        self,
        rules: SendRules,
        sender: Sender,
        tracking: TrackingWriter | None,
        tracking_deadline: float = 10.0,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        on_tracking_failure: Callable[[], None] = lambda: None,
        pending: PendingTracking | None = None,
        on_expired: Callable[[], None] = lambda: None,
    ) -> None:
        self._rules = rules
        self._sender = sender
        self._tracking = tracking
        self._tracking_deadline = tracking_deadline
        self._new_id = new_id
        self._on_tracking_failure = on_tracking_failure
        self._pending = pending
        self._on_expired = on_expired

    def start_tracking(self, tracking: TrackingWriter) -> None:
        """Record sends from now on (the KV store became available after start)."""
        self._tracking = tracking

    async def __call__(self, data: bytes, deadline: Deadline | None = None) -> bytes:
        """One request; ``deadline`` is when its caller stops waiting (none:
        no limit of its own, the sender's ``SEND_TIMEOUT`` still applies)."""
        deadline = deadline or Deadline.never()
        request = parse_request(data, api.SendEmailRequest)
        if request is None or len(request.group_id.encode()) > api.MAX_GROUP_ID_BYTES:
            return error_reply(api.ERR_INVALID_PAYLOAD)
        if not (request.to and request.subject and request.html and request.text):
            return error_reply(api.ERR_SEND_FIELDS_REQUIRED)

        rules = self._rules
        to_value = strip_line_breaks(request.to)
        recipient = parse_mailbox(to_value)
        if rules.allowed_recipient_domains and (
            recipient is None
            or not domain_is_within(recipient.domain, rules.allowed_recipient_domains)
        ):
            log.info(
                "recipient outside SMTP_ALLOWED_RECIPIENT_DOMAINS; skipped",
                extra={"to": redact(to_value)},
            )
            return reply(_SKIPPED)
        if recipient is None:
            return error_reply(api.ERR_INVALID_TO)

        sender = rules.default_from
        if request.from_:
            parsed_from = parse_mailbox(strip_line_breaks(request.from_))
            if parsed_from is None:
                return error_reply(api.ERR_INVALID_FROM)
            if not domain_is_listed(parsed_from.domain, rules.allowed_from_domains):
                return error_reply(api.ERR_FROM_DOMAIN_NOT_ALLOWED)
            sender = parsed_from

        reply_to = None
        if request.reply_to:
            reply_to = parse_mailbox(strip_line_breaks(request.reply_to))
            if reply_to is None:
                return error_reply(api.ERR_INVALID_REPLY_TO)
            if not domain_is_within(reply_to.domain, rules.allowed_reply_to_domains):
                return error_reply(api.ERR_REPLY_TO_DOMAIN_NOT_ALLOWED)

        if not rules.email_enabled:
            log.info("EMAIL_ENABLED is false; not sending", extra={"to": redact(recipient.address)})
            return reply(_SKIPPED)

        email = OutgoingEmail(
            email_id=self._new_id(),
            group_id=request.group_id or str(uuid.uuid4()),
            sender=sender,
            sender_display_name=request.from_display_name or rules.default_from_display_name,
            recipient=recipient,
            reply_to=reply_to,
            subject=request.subject,
            text=request.text,
            html=request.html,
            configuration_set=rules.configuration_set,
        )
        context = {
            "email_id": email.email_id,
            "group_id": email.group_id,
            "to": redact(recipient.address),
        }
        if deadline.expired:
            # The caller has left (or is about to): a message sent now would be
            # answered to nobody, and a caller that retries would send it twice.
            self._on_expired()
            log.info("deadline passed before sending; not sent", extra=context)
            return error_reply(api.ERR_DELIVERY_FAILED)
        try:
            await self._sender.send(
                sender.address, recipient.address, build_message(email), deadline
            )
        except DeadlinePassed as exc:
            self._on_expired()
            log.warning("email delivery failed", extra={**context, "reason": exc.reason})
            return error_reply(api.ERR_DELIVERY_FAILED)
        except SendFailure as exc:
            log.warning("email delivery failed", extra={**context, "reason": exc.reason})
            return error_reply(api.ERR_DELIVERY_FAILED)
        log.info("email sent", extra=context)

        tracking = self._tracking
        if tracking is not None:
            record = api.TrackingRecord(
                group_id=email.group_id,
                email_id=email.email_id,
                to=to_value,
                subject=request.subject,
                sent_at=datetime.now(UTC),
            )
            await self._write_tracking(tracking, record, deadline)
        return reply(api.SendEmailReply(email_id=email.email_id, group_id=email.group_id))

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
        delay = 0.05
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
                await anyio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 2.0)
        if self._pending is not None and self._pending.add(
            record, tracking, record_stored=record_stored
        ):
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
