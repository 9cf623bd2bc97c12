"""What a ``send_email`` request asks for, decided without doing any of it.

:func:`decide_send` applies the contract's checks in the contract's order and
answers one of three things: :class:`Send` (the email and its tracking
record), :class:`Skip` (answer success with empty ids, send nothing) or a
contract error (:class:`emailrelay.api.ErrorReply`). It touches no socket,
clock or random source: the new ids and the time come in as arguments, so
every rule is a plain function call in the tests (tests/test_send_decision.py).
The effects (the send, then the tracking writes) are in
:mod:`emailrelay.handlers.send`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from emailrelay import api
from emailrelay.addresses import (
    Mailbox,
    domain_is_listed,
    domain_is_within,
    parse_mailbox,
    redact,
    strip_line_breaks,
)
from emailrelay.handlers.replies import error_reply, parse_request
from emailrelay.mail.message import OutgoingEmail
from emailrelay.store.idempotency import request_fingerprint


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


@dataclass(frozen=True)
class NewIds:
    """The ids a request gets if it is sent: its ``email_id``, and the
    ``group_id`` used when the request names none."""

    email_id: str
    group_id: str

    @classmethod
    def random(cls) -> NewIds:
        return cls(str(uuid.uuid4()), str(uuid.uuid4()))


@dataclass(frozen=True)
class Idempotency:
    """The caller's idempotency key and the fingerprint of its request
    (emailrelay.store.idempotency)."""

    key: str
    fingerprint: str


@dataclass(frozen=True)
class Send:
    """Send ``email``; once it is out, store ``record``. With ``idempotency``,
    reserve the key first (the handler does)."""

    email: OutgoingEmail
    record: api.TrackingRecord
    idempotency: Idempotency | None = None


@dataclass(frozen=True)
class Skip:
    """Answer success with empty ids and send nothing (a rule says so)."""

    reason: str
    """The log line that says which rule."""
    to: str
    """The recipient, redacted, for that log line."""
    recipient: str | None = None
    """Set only by check 7 (``EMAIL_ENABLED``): the recipient's bare address,
    which passed checks 1 to 6. The suppression list is checked between 6
    and 7, so the handler checks it before it answers this skip."""


SKIPPED_REPLY = api.SendEmailReply(email_id="", group_id="")

Decision = Send | Skip | api.ErrorReply


def idempotency_key_of(field: str, header: str | None) -> str | None:
    """The request's idempotency key (``""``: none), or ``None`` when the
    key is unusable (an ``invalid request payload``, nothing sent).

    nats-py hands header values over trimmed, so the field is trimmed too
    before the two are compared and used: ``"order 7 "`` in both is one key,
    ``order 7``. An empty field means absent, as every empty field does; a
    field of only whitespace, or a header that is present but blank, is
    refused: sending it unkeyed would let the caller's retry send twice.
    Both set and different, or longer than ``MAX_IDEMPOTENCY_KEY_CHARS``
    after trimming, is refused too."""
    key = field.strip()
    if field and not key:
        return None
    if header is not None:
        header = header.strip()
        if not header or (key and key != header):
            return None
        key = header
    return key if len(key) <= api.MAX_IDEMPOTENCY_KEY_CHARS else None


def decide_send(
    request: bytes,
    rules: SendRules,
    new_ids: NewIds,
    now: datetime,
    idempotency_header: str | None = None,
) -> Decision:
    """The contract's checks on the request body, in the contract's order
    (docs/contract.md): payload, required fields, recipient allowlist,
    ``to``, ``from``, ``reply_to``, then ``EMAIL_ENABLED``. ``now`` becomes
    the record's ``sent_at``. ``idempotency_header``: the request's
    ``Idempotency-Key`` header (``None`` when absent), the same as the
    ``idempotency_key`` field (see :func:`idempotency_key_of`)."""
    parsed = parse_request(request, api.SendEmailRequest)
    if parsed is None or len(parsed.group_id.encode()) > api.MAX_GROUP_ID_BYTES:
        return error_reply(api.ERR_INVALID_PAYLOAD)
    idempotency_key = idempotency_key_of(parsed.idempotency_key, idempotency_header)
    if idempotency_key is None:
        return error_reply(api.ERR_INVALID_PAYLOAD)
    if not (parsed.to and parsed.subject and parsed.html and parsed.text):
        return error_reply(api.ERR_SEND_FIELDS_REQUIRED)

    to_value = strip_line_breaks(parsed.to)
    recipient = parse_mailbox(to_value)
    if rules.allowed_recipient_domains and (
        recipient is None or not domain_is_within(recipient.domain, rules.allowed_recipient_domains)
    ):
        return Skip("recipient outside SMTP_ALLOWED_RECIPIENT_DOMAINS; skipped", redact(to_value))
    if recipient is None:
        return error_reply(api.ERR_INVALID_TO, _why_not_one_address(to_value))

    sender = rules.default_from
    if parsed.from_:
        parsed_from = parse_mailbox(strip_line_breaks(parsed.from_))
        if parsed_from is None:
            return error_reply(api.ERR_INVALID_FROM)
        if not domain_is_listed(parsed_from.domain, rules.allowed_from_domains):
            return error_reply(
                api.ERR_FROM_DOMAIN_NOT_ALLOWED, _allowed(rules.allowed_from_domains)
            )
        sender = parsed_from

    reply_to = None
    if parsed.reply_to:
        reply_to = parse_mailbox(strip_line_breaks(parsed.reply_to))
        if reply_to is None:
            return error_reply(api.ERR_INVALID_REPLY_TO)
        if not domain_is_within(reply_to.domain, rules.allowed_reply_to_domains):
            return error_reply(
                api.ERR_REPLY_TO_DOMAIN_NOT_ALLOWED,
                _allowed(rules.allowed_reply_to_domains, " and their subdomains"),
            )

    if not rules.email_enabled:
        return Skip(
            "EMAIL_ENABLED is false; not sending",
            redact(recipient.address),
            recipient=recipient.address,
        )

    email = OutgoingEmail(
        email_id=new_ids.email_id,
        group_id=parsed.group_id or new_ids.group_id,
        sender=sender,
        sender_display_name=parsed.from_display_name or rules.default_from_display_name,
        recipient=recipient,
        reply_to=reply_to,
        subject=parsed.subject,
        text=parsed.text,
        html=parsed.html,
        configuration_set=rules.configuration_set,
    )
    record = api.TrackingRecord(
        group_id=email.group_id,
        email_id=email.email_id,
        to=to_value,
        subject=parsed.subject,
        sent_at=now,
    )
    idempotency = (
        Idempotency(idempotency_key, request_fingerprint(parsed)) if idempotency_key else None
    )
    return Send(email, record, idempotency)


def _why_not_one_address(value: str) -> str:
    """The ``invalid to address`` detail: a list is the common mistake."""
    parts = [part for part in value.replace(";", ",").split(",") if part.strip()]
    if len(parts) > 1:
        return "one recipient per request: send one request per address"
    return "not one address (expected a@example.com or Name <a@example.com>)"


def _allowed(domains: tuple[str, ...], scope: str = "") -> str:
    """A refused domain's detail: the relay's own allowlist (configuration, no secret)."""
    if not domains:
        return "no domain is allowed (the relay's allowlist is empty)"
    return f"allowed: {', '.join(domains)}{scope}"
