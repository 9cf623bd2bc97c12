"""The ``EMAIL_EVENTS`` stream's messages, built from a tracking record and
what happened to it. Pure functions, no I/O (publishing is
:mod:`emailrelay.engagement.stream`'s job).

Why an event's id can never repeat for two different events, and is the same
for every copy of one event:

* ``sent:<email_id>``: email ids are unique (UUID4s the relay makes), and one
  email is accepted by the provider once.
* an SES event: ``<type>:`` and the SHA-256 of the SES message id, the type,
  the event's own timestamp and the recipient. SES gives each message one id
  and stamps each event with the time it happened, so two copies of one event
  (an SQS redelivery, a second SNS notification, two replicas racing on it)
  hash the same, while two opens of one message differ in their timestamps.
  Nothing of the SQS or SNS envelope goes in: those ids differ between copies.

An event without an SES message id (never seen from SES) stands in with the
email id; one without a usable timestamp hashes an empty time, so its copies
still agree (the record takes the time of processing instead, which they
would not).
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from emailrelay.addresses import parse_mailbox
from emailrelay.api import EmailEvent, TrackingRecord, format_time
from emailrelay.engagement.events import EngagementEvent, EventKind

STREAM_TYPES = {
    EventKind.DELIVERY: "delivered",
    EventKind.OPEN: "opened",
    EventKind.CLICK: "clicked",
    EventKind.BOUNCE: "bounced",
    EventKind.COMPLAINT: "complained",
    EventKind.DELIVERY_DELAY: "delayed",
    EventKind.REJECT: "rejected",
}
"""SES event kind -> stream ``type``. SES ``Send`` is not here: ``sent``,
published by the send path, already says the provider accepted the message."""


def recipient_of(record: TrackingRecord) -> str:
    """The bare address of the record's ``to`` (``Name <a@b>`` gives ``a@b``);
    the value itself when it no longer parses (a record shortened to fit)."""
    mailbox = parse_mailbox(record.to)
    return mailbox.address if mailbox is not None else record.to


def sent_event(record: TrackingRecord) -> EmailEvent:
    """``sent``: the provider accepted the message this record tracks."""
    return EmailEvent(
        event_id=f"sent:{record.email_id}",
        type="sent",
        email_id=record.email_id,
        group_id=record.group_id,
        recipient=recipient_of(record),
        occurred_at=record.sent_at,
        ses_message_id=record.ses_message_id,
    )


def ses_outcome(record: TrackingRecord, event: EngagementEvent, now: datetime) -> EmailEvent | None:
    """The stream event for an SES event applied to ``record``; ``None`` for
    a kind the stream does not carry (``Send``). ``now`` stands in for an
    event without a usable time, as it does in the record."""
    event_type = STREAM_TYPES.get(event.kind)
    if event_type is None:
        return None
    recipient = recipient_of(record)
    return EmailEvent(
        event_id=ses_event_id(
            event_type,
            event.ses_message_id or record.email_id,
            event.occurred_at,
            recipient,
        ),
        type=event_type,
        email_id=record.email_id,
        group_id=record.group_id,
        recipient=recipient,
        occurred_at=event.occurred_at or now,
        bounce_type=event.bounce_type if event.kind is EventKind.BOUNCE else None,
        bounce_sub_type=event.bounce_sub_type if event.kind is EventKind.BOUNCE else None,
        complaint_feedback_type=(
            event.complaint_feedback_type if event.kind is EventKind.COMPLAINT else None
        ),
        link=event.link if event.kind is EventKind.CLICK else None,
        ses_message_id=event.ses_message_id or record.ses_message_id,
    )


def ses_event_id(
    event_type: str, ses_message_id: str, occurred_at: datetime | None, recipient: str
) -> str:
    """``<type>:<SHA-256 hex>`` of what identifies one SES event (module docstring)."""
    when = format_time(occurred_at) if occurred_at is not None else ""
    material = "\0".join((ses_message_id, event_type, when, recipient.lower()))
    return f"{event_type}:{hashlib.sha256(material.encode('utf-8', 'replace')).hexdigest()}"
