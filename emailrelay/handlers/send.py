"""``lfx.email-service.send_email``: the effects of a decision.

What a request asks for is decided by the pure
:func:`emailrelay.handlers.send_decision.decide_send`; this handler carries
it out: the suppression check (between the contract's checks 6 and 7), the
idempotency reservation, the send, then the tracking writes, then the reply.
``NoSender`` and ``NoTracking`` stand for "sending is off" and "no KV store".

Idempotent sends (a request with an ``idempotency_key``, see
emailrelay.store.idempotency): only a request that passed every check and
still has time reserves its key, right before the send. The key then ends
``completed`` (the provider accepted: a retry gets this reply again),
``released`` (nothing was handed over: a retry may send) or ``unknown`` (the
whole message was handed over and no answer came: a retry gets ``email
delivery outcome unknown``). A store that cannot reserve within
:data:`RESERVATION_WAIT` fails the send (``email delivery failed``, safe to
retry with the key): a keyed send never goes out unreserved, and during a
JetStream election it is told so in seconds, not at its deadline.

The reply after a send does not wait for an election: the tracking writes get
``tracking_wait`` (TRACKING_WAIT, 1 s by default, never past the request's
deadline); what is not stored by then is handed to the pending writes
(emailrelay.store.pending) and the success goes at once. A late success is
as dangerous as an error: its caller times out and sends again.

Suppression (``SUPPRESSION_ENABLED=true``): a suppressed recipient answers
``recipient suppressed`` with no SMTP contact and no record. A list that
cannot be read does not block the send (fail open: a log line and
``emailrelay_suppression_check_failures``): the list is a courtesy to the
provider's reputation, a missed email is a caller's outage."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

import anyio

from emailrelay import api
from emailrelay.addresses import redact
from emailrelay.deadline import Deadline, DeadlinePassed
from emailrelay.handlers.replies import Replayed, Reply, error_reply
from emailrelay.handlers.send_decision import (
    SKIPPED_REPLY,
    Idempotency,
    NewIds,
    Send,
    SendRules,
    Skip,
    decide_send,
)
from emailrelay.mail.errors import AmbiguousFailure, SendFailure
from emailrelay.mail.message import build_message
from emailrelay.metrics import (
    IDEMPOTENCY_WRITE_FAILURES,
    IDEMPOTENT_REPLIES,
    SKIPPED_SENDS,
    SUPPRESSED_SENDS,
    SUPPRESSION_CHECK_FAILURES,
)
from emailrelay.store.idempotency import (
    Completed,
    InProgress,
    Mismatch,
    OutcomeUnknown,
    Reservation,
    Reserved,
)
from emailrelay.store.kv import BucketMissing, StoreError
from emailrelay.supervision import Backoff

__all__ = [
    "RESERVATION_WAIT",
    "TRACKING_WAIT",
    "NoPending",
    "NoReservations",
    "NoSender",
    "NoTracking",
    "PendingTracking",
    "Reservations",
    "SendEmailHandler",
    "SendRules",
    "Sender",
    "SentEvents",
    "SuppressionList",
    "TrackingNotOpenYet",
    "TrackingOnceOpen",
    "TrackingWriter",
]

log = logging.getLogger(__name__)

TRACKING_WAIT = 1.0
"""Default of TRACKING_WAIT: a healthy store answers in milliseconds, and a
JetStream leader election (4 to 9 s after a node is lost) must not hold a reply."""

TRACKING_ATTEMPT_WAIT = 0.3
"""Longest one attempt of the tracking writes may take within TRACKING_WAIT.
A JetStream reply lost on the way (the relay's node restarting, a leader
handing over on SIGTERM) never comes: trying again after 0.3 s stores the
record within the wait (a retried create that conflicts means the first one
landed; an append skips an id already indexed), where waiting for the lost
reply would use up the whole wait and queue it."""

RESERVATION_WAIT = 2.0
"""Longest wait for an idempotency reservation (its read and its write; a
reservation cannot be deferred like a tracking write): beyond it the send is
not made and answers ``email delivery failed``. A healthy store answers in
milliseconds; 2 s leaves room for a loaded host and still tells a caller with
a 10 s timeout in time to retry."""

SETTLE_WAIT = 1.0
"""Longest wait for storing a send's outcome under its key (``_settle``)."""

SETTLE_AFTER_DEADLINE = 0.3
"""Past the request's deadline (a DATA reply that came late, or a cut-off),
the outcome's write gets only this long: the reply must still leave by
receipt + SEND_TIMEOUT + DATA_REPLY_WAIT + this (9.3 s with the defaults)."""


class Sender(Protocol):
    async def send(
        self, sender: str, recipient: str, message: bytes, deadline: Deadline
    ) -> str | None:
        """Deliver or raise :class:`~emailrelay.mail.errors.SendFailure`;
        start nothing after ``deadline`` (raise
        :class:`~emailrelay.deadline.DeadlinePassed`). Returns the provider's
        message id when it named one (the record keeps it as ``ses_message_id``)."""
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


class SentEvents(Protocol):
    """:class:`emailrelay.engagement.stream.SentEvents` (``EVENTS_STREAM_ENABLED=true``)."""

    async def sent(self, record: api.TrackingRecord, deadline: Deadline) -> None:
        """Publish the ``sent`` event, or leave it for later; never raises."""
        ...


class Reservations(Protocol):
    """Idempotency keys (:class:`emailrelay.store.idempotency.IdempotencyStore`)."""

    async def reserve(self, idempotency_key: str, fingerprint: str) -> Reservation: ...
    async def wait_for_outcome(
        self, idempotency_key: str, fingerprint: str, until: float
    ) -> Reservation: ...
    async def complete(self, reserved: Reserved, reply: api.SendEmailReply) -> None: ...
    async def release(self, reserved: Reserved) -> None: ...
    async def mark_unknown(self, reserved: Reserved) -> None: ...


class SuppressionList(Protocol):
    """:class:`emailrelay.store.suppressions.SuppressionStore`, as the send path uses it."""

    async def is_suppressed(self, address: str) -> bool: ...


class NoReservations:
    """The ``email-idempotency`` bucket is not available: a request with a
    key cannot be reserved, so it is not sent (``email delivery failed``)."""

    async def reserve(self, idempotency_key: str, fingerprint: str) -> Reservation:
        raise StoreError("the email-idempotency bucket is not available")

    async def wait_for_outcome(
        self, idempotency_key: str, fingerprint: str, until: float
    ) -> Reservation:
        raise StoreError("the email-idempotency bucket is not available")

    async def complete(self, reserved: Reserved, reply: api.SendEmailReply) -> None:
        raise StoreError("the email-idempotency bucket is not available")

    async def release(self, reserved: Reserved) -> None:
        raise StoreError("the email-idempotency bucket is not available")

    async def mark_unknown(self, reserved: Reserved) -> None:
        raise StoreError("the email-idempotency bucket is not available")


class NoSender:
    """EMAIL_ENABLED=false: the decision skips every request before a send,
    so this is never asked; if it were, the caller hears "not sent"."""

    async def send(
        self, sender: str, recipient: str, message: bytes, deadline: Deadline
    ) -> str | None:
        raise SendFailure("sending is disabled (EMAIL_ENABLED=false)")


class NoTracking:
    """No KV store: sends are not recorded (unit tests, tools)."""

    async def create_record(self, record: api.TrackingRecord) -> None:
        return None

    async def append_to_group(self, group_id: str, email_id: str) -> None:
        return None


class TrackingNotOpenYet(StoreError):
    """The KV store has not been opened yet (JetStream electing its first
    leader, buckets still to be declared)."""


class TrackingOnceOpen:
    """The tracking writer of a relay that started before its KV store could
    be opened: each write fails at once with :class:`TrackingNotOpenYet` (the
    send hands it to the pending writes without waiting) until :meth:`open`,
    from then on it writes to the store. The pending writes hold this object,
    so what they kept is stored once the buckets open."""

    def __init__(self) -> None:
        self._store: TrackingWriter | None = None

    def open(self, store: TrackingWriter) -> None:
        self._store = store

    async def create_record(self, record: api.TrackingRecord) -> None:
        if self._store is None:
            raise TrackingNotOpenYet("the KV store is not open yet")
        await self._store.create_record(record)

    async def append_to_group(self, group_id: str, email_id: str) -> None:
        if self._store is None:
            raise TrackingNotOpenYet("the KV store is not open yet")
        await self._store.append_to_group(group_id, email_id)


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
        tracking_wait: float = TRACKING_WAIT,
        new_ids: Callable[[], NewIds] = NewIds.random,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_tracking_failure: Callable[[], None] = lambda: None,
        pending: PendingTracking | None = None,
        on_expired: Callable[[], None] = lambda: None,
        reservations: Reservations | None = None,
        suppressions: SuppressionList | None = None,
        sent_events: SentEvents | None = None,
    ) -> None:
        self._rules = rules
        self._sender = sender
        self._tracking = tracking
        self._tracking_wait = tracking_wait
        self._new_ids = new_ids
        self._now = now
        self._on_tracking_failure = on_tracking_failure
        self._pending = pending if pending is not None else NoPending()
        self._on_expired = on_expired
        self._reservations: Reservations = reservations or NoReservations()
        self._suppressions = suppressions
        self._sent_events = sent_events

    def start_reservations(self, reservations: Reservations) -> None:
        """Serve idempotency keys from now on (the bucket became available after start)."""
        self._reservations = reservations

    def start_suppressions(self, suppressions: SuppressionList) -> None:
        """Check the suppression list from now on (its bucket became available)."""
        self._suppressions = suppressions

    async def __call__(
        self,
        data: bytes,
        deadline: Deadline | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One request; ``deadline`` is when its caller stops waiting (none:
        no limit of its own, the sender's ``SEND_TIMEOUT`` still applies);
        ``headers``: the request's NATS headers (``Idempotency-Key``)."""
        deadline = deadline or Deadline.never()
        decision = decide_send(
            data, self._rules, self._new_ids(), self._now(), _idempotency_header(headers)
        )
        if isinstance(decision, Skip):
            if decision.recipient is not None and await self._suppressed(
                decision.recipient, deadline
            ):
                return error_reply(api.ERR_RECIPIENT_SUPPRESSED)
            log.info(decision.reason, extra={"to": decision.to})
            SKIPPED_SENDS.labels(
                "email_disabled" if decision.recipient is not None else "recipient_domain"
            ).inc()
            return SKIPPED_REPLY
        if isinstance(decision, Send):
            if await self._suppressed(decision.email.recipient.address, deadline):
                return error_reply(api.ERR_RECIPIENT_SUPPRESSED)
            return await self._send(decision, deadline)
        return decision

    async def _suppressed(self, address: str, deadline: Deadline) -> bool:
        """Whether the list holds ``address``; ``False`` when it cannot say
        (fail open, see the module docstring)."""
        if self._suppressions is None:
            return False
        with deadline.scope():
            try:
                found = await self._suppressions.is_suppressed(address)
            except Exception as exc:
                SUPPRESSION_CHECK_FAILURES.inc()
                log.warning(
                    "suppression list not readable; sending anyway",
                    extra={"to": redact(address), "error": repr(exc)},
                )
                return False
            if found:
                SUPPRESSED_SENDS.inc()
                log.info("recipient suppressed; not sending", extra={"to": redact(address)})
            return found
        return False  # the deadline passed: the send path answers that

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
        if decision.idempotency is None:
            return await self._deliver(decision, deadline, None, context)
        answer = await self._reserve(decision.idempotency, deadline, context)
        if isinstance(answer, Reserved):
            if deadline.expired:
                await self._settle(self._reservations.release, answer, context, deadline)
                self._on_expired()
                log.info("deadline passed while waiting for the key; not sent", extra=context)
                return error_reply(api.ERR_DELIVERY_FAILED)
            return await self._deliver(decision, deadline, answer, context)
        return answer

    async def _reserve(
        self, idempotency: Idempotency, deadline: Deadline, context: dict[str, str]
    ) -> Reserved | Reply:
        """The reservation, or the reply the key already holds. The reservation
        itself gets :data:`RESERVATION_WAIT`; a key another request is sending
        with is waited on until the deadline."""
        answer: Reservation | None = None
        try:
            with deadline.scope():
                with anyio.fail_after(RESERVATION_WAIT):
                    answer = await self._reservations.reserve(
                        idempotency.key, idempotency.fingerprint
                    )
                if isinstance(answer, InProgress):
                    IDEMPOTENT_REPLIES.labels("in_progress").inc()
                    until = anyio.current_time() + deadline.remaining()
                    answer = await self._reservations.wait_for_outcome(
                        idempotency.key, idempotency.fingerprint, until
                    )
        except Exception as exc:
            IDEMPOTENT_REPLIES.labels("store_failed").inc()
            log.warning(
                "idempotency key could not be reserved; not sent",
                extra={**context, "error": repr(exc)},
            )
            return error_reply(api.ERR_DELIVERY_FAILED)
        if answer is None:
            self._on_expired()
            log.info("deadline passed while reserving the key; not sent", extra=context)
            return error_reply(api.ERR_DELIVERY_FAILED)
        if isinstance(answer, Reserved):
            IDEMPOTENT_REPLIES.labels("reserved").inc()
            return answer
        if isinstance(answer, Completed):
            IDEMPOTENT_REPLIES.labels("completed").inc()
            log.info(
                "idempotency key already sent; first reply again",
                extra={**context, "email_id": answer.reply.email_id},
            )
            return Replayed(answer.reply)
        if isinstance(answer, Mismatch):
            IDEMPOTENT_REPLIES.labels("mismatch").inc()
            return error_reply(api.ERR_IDEMPOTENCY_KEY_REUSED)
        if isinstance(answer, OutcomeUnknown):
            IDEMPOTENT_REPLIES.labels("unknown").inc()
            return error_reply(api.ERR_DELIVERY_OUTCOME_UNKNOWN)
        # Still in progress at the deadline: nothing was sent by this request,
        # and a retry with the key gets the first one's outcome.
        self._on_expired()
        log.info("deadline passed while another send held the key", extra=context)
        return error_reply(api.ERR_DELIVERY_FAILED)

    async def _deliver(
        self,
        decision: Send,
        deadline: Deadline,
        reserved: Reserved | None,
        context: dict[str, str],
    ) -> Reply:
        email = decision.email
        try:
            # Built once, whatever the transport; dated as the record is.
            message = build_message(email, decision.record.sent_at)
            message_id = await self._sender.send(
                email.sender.address, email.recipient.address, message, deadline
            )
        except AmbiguousFailure as exc:
            log.warning("email delivery outcome unknown", extra={**context, "reason": exc.reason})
            if reserved is None:
                return error_reply(api.ERR_DELIVERY_FAILED)
            await self._settle(self._reservations.mark_unknown, reserved, context, deadline)
            return error_reply(api.ERR_DELIVERY_OUTCOME_UNKNOWN)
        except SendFailure as exc:
            if isinstance(exc, DeadlinePassed):
                self._on_expired()
            log.warning("email delivery failed", extra={**context, "reason": exc.reason})
            if reserved is not None:
                await self._settle(self._reservations.release, reserved, context, deadline)
            return error_reply(api.ERR_DELIVERY_FAILED)
        log.info("email sent", extra=context)
        reply = api.SendEmailReply(email_id=email.email_id, group_id=email.group_id)
        if reserved is not None:
            # First, before tracking: the shorter the time between the
            # provider's acceptance and this write, the smaller the window in
            # which a crash leaves the key in progress.
            await self._settle(
                lambda r: self._reservations.complete(r, reply), reserved, context, deadline
            )

        record = decision.record
        if message_id is not None:
            record = record.model_copy(update={"ses_message_id": message_id})
        # Without a store there is nothing to write and nothing to retry (a
        # deadline passing inside the retry loop would count a no-op as lost).
        if not isinstance(self._tracking, NoTracking):
            await self._write_tracking(self._tracking, record, deadline)
        if self._sent_events is not None:
            await self._sent_events.sent(record, deadline)
        return reply

    async def _settle(
        self,
        write: Callable[[Reserved], Awaitable[None]],
        reserved: Reserved,
        context: dict[str, str],
        deadline: Deadline,
    ) -> None:
        """Store a send's outcome under its key, within :data:`SETTLE_WAIT`
        (:data:`SETTLE_AFTER_DEADLINE` once the deadline passed: the reply
        must not wait for an election). A failure only logs: the entry stays
        in progress and reads as outcome unknown after ``SEND_TIMEOUT`` plus a
        grace, so no retry sends twice."""
        wait = min(SETTLE_WAIT, max(deadline.remaining(), 0.0) + SETTLE_AFTER_DEADLINE)
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(wait):
                await write(reserved)
        except Exception as exc:
            IDEMPOTENCY_WRITE_FAILURES.inc()
            log.warning(
                "idempotency outcome not stored; the key reads as outcome unknown later",
                extra={**context, "error": repr(exc)},
            )

    async def _write_tracking(
        self, tracking: TrackingWriter, record: api.TrackingRecord, deadline: Deadline
    ) -> None:
        """Store the record, then index it, retrying a failing store for
        ``tracking_wait`` at most and never past the request's deadline
        (``deadline.scope()`` also ends at once when the shutdown grace cuts
        requests off). What is not stored by then is handed to the pending
        writes, which finish it once the store answers. Either way the email
        is out, so the caller gets its success at once (an error, or a success
        that comes after the caller gave up, would invite a duplicate send)."""
        record_stored = False
        backoff = Backoff(initial=0.05, maximum=0.5)
        attempt = 0
        wait = min(self._tracking_wait, max(deadline.remaining(), 0.0))
        with deadline.scope(), anyio.move_on_after(wait):
            while True:
                try:
                    with anyio.fail_after(TRACKING_ATTEMPT_WAIT):
                        if not record_stored:
                            await tracking.create_record(record)
                            record_stored = True
                        await tracking.append_to_group(record.group_id, record.email_id)
                    return
                except TrackingNotOpenYet:
                    break  # started during an election: straight to the pending writes
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
        # The pending writes are full (JetStream gone for long): this id is
        # logged here, once, and counted; the caller still gets its success.
        self._on_tracking_failure()
        log.error(
            "tracking write failed for good; the email was sent",
            extra={"email_id": record.email_id, "group_id": record.group_id},
        )


def _idempotency_header(headers: Mapping[str, str] | None) -> str | None:
    """The ``Idempotency-Key`` header's value (name matched case-insensitively,
    as HTTP-style headers are); ``None`` when absent (present and blank is
    ``""``, which the rules refuse)."""
    if not headers:
        return None
    wanted = api.IDEMPOTENCY_HEADER.lower()
    return next((value for name, value in headers.items() if name.lower() == wanted), None)
