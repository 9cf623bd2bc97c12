"""SES engagement events: SQS message bodies in, typed events out, and the
change each event makes to a tracking record. Pure functions, no I/O.

A body is either an SNS notification whose ``Message`` is the SES event JSON,
or the SES event itself (SNS raw message delivery). See CONTRACT.md
"Engagement events" and docs/engagement.md for the rules.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from emailrelay.addresses import replace_lone_surrogates
from emailrelay.api import (
    CLICKS_KEPT,
    OPENS_KEPT,
    TRACKING_HEADER,
    ClickEvent,
    OpenEvent,
    TrackingRecord,
)
from emailrelay.store.keys import is_valid_key


class EventKind(enum.StrEnum):
    """The SES event types that change a record; the value is the metrics label."""

    SEND = "send"
    DELIVERY = "delivery"
    OPEN = "open"
    CLICK = "click"
    BOUNCE = "bounce"
    COMPLAINT = "complaint"
    REJECT = "reject"
    DELIVERY_DELAY = "delivery_delay"


# SES type names (lower-cased) -> kind. "Rendering Failure", "Subscription" and
# anything else are skipped.
_KINDS = {
    "send": EventKind.SEND,
    "delivery": EventKind.DELIVERY,
    "open": EventKind.OPEN,
    "click": EventKind.CLICK,
    "bounce": EventKind.BOUNCE,
    "complaint": EventKind.COMPLAINT,
    "reject": EventKind.REJECT,
    "deliverydelay": EventKind.DELIVERY_DELAY,
}

# Where each kind keeps its own timestamp (SES's "detail object").
_DETAIL_OBJECT = {
    EventKind.SEND: "send",
    EventKind.DELIVERY: "delivery",
    EventKind.OPEN: "open",
    EventKind.CLICK: "click",
    EventKind.BOUNCE: "bounce",
    EventKind.COMPLAINT: "complaint",
    EventKind.REJECT: "reject",
    EventKind.DELIVERY_DELAY: "deliveryDelay",
}

MAX_EVENT_ID = 256
"""A longer event id (SNS/SQS ``MessageId``, a UUID in practice) is kept as
``sha256:<hex>`` of itself: still a dedupe key, and a bounded list entry."""
MAX_DETAIL_TEXT = 1024
"""SES detail strings (bounce type, reject reason, …) are short enumerations;
longer ones are cut to this many characters so a record always fits."""


@dataclass(frozen=True, slots=True)
class EngagementEvent:
    """One SES event addressed to one tracked email."""

    kind: EventKind
    email_id: str
    event_id: str
    """SNS ``MessageId``, or the SQS ``MessageId`` for a raw event: the dedupe key."""
    occurred_at: datetime | None
    """From the detail object (``open.timestamp``...); None when absent or unparseable."""
    published_at: datetime | None
    """The best SES time known (detail, else ``mail.timestamp``), for queue lag."""
    link: str | None = None
    bounce_type: str | None = None
    bounce_sub_type: str | None = None
    complaint_feedback_type: str | None = None
    reject_reason: str | None = None
    delay_type: str | None = None
    ses_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A message to delete without touching any record. ``label`` is a metric
    label from a small fixed set (``malformed``, ``no_tracking_header``,
    ``rendering_failure``, ``subscription``, ``other``); ``reason`` is for the
    log (never the body)."""

    label: str
    reason: str


def parse_message(body: str, sqs_message_id: str) -> EngagementEvent | Skipped:
    """Read one SQS message body (SNS-wrapped or raw SES event)."""
    outer = json_object(body)
    if outer is None:
        return Skipped("malformed", "body is not a JSON object")
    if "eventType" in outer or "notificationType" in outer:
        return _parse_ses_event(outer, sqs_message_id)
    if "Message" not in outer:
        return Skipped("malformed", "neither an SNS notification nor an SES event")
    if outer.get("Type", "Notification") != "Notification":
        return Skipped("other", f"SNS message of type {str(outer.get('Type'))[:40]!r}")
    message = outer["Message"]
    inner = json_object(message) if isinstance(message, str) else None
    if inner is None:
        return Skipped("malformed", "SNS Message is not an SES event JSON object")
    sns_id = outer.get("MessageId")
    event_id = sns_id if isinstance(sns_id, str) and sns_id else sqs_message_id
    return _parse_ses_event(inner, event_id)


def _bounded_event_id(event_id: str) -> str:
    event_id = replace_lone_surrogates(event_id)
    if len(event_id) <= MAX_EVENT_ID:
        return event_id
    return "sha256:" + hashlib.sha256(event_id.encode()).hexdigest()


def _parse_ses_event(event: dict[str, Any], event_id: str) -> EngagementEvent | Skipped:
    type_name = event.get("eventType", event.get("notificationType"))
    if not isinstance(type_name, str):
        return Skipped("malformed", "eventType/notificationType is not a string")
    folded = type_name.strip().lower()
    kind = _KINDS.get(folded)
    if kind is None:
        label = {"rendering failure": "rendering_failure", "subscription": "subscription"}
        return Skipped(label.get(folded, "other"), f"event type {type_name[:40]!r} not tracked")
    mail = event.get("mail")
    if not isinstance(mail, dict):
        return Skipped("malformed", "event has no mail object")
    email_id = _tracked_email_id(mail.get("headers"))
    if email_id is None:
        return Skipped("no_tracking_header", f"no usable {TRACKING_HEADER} header")
    detail = event.get(_DETAIL_OBJECT[kind])
    detail = detail if isinstance(detail, dict) else {}
    occurred_at = parse_time(detail.get("timestamp"))
    ses_message_id = mail.get("messageId")
    return EngagementEvent(
        kind=kind,
        email_id=email_id,
        event_id=_bounded_event_id(event_id),
        occurred_at=occurred_at,
        published_at=occurred_at or parse_time(mail.get("timestamp")),
        link=_text(detail.get("link"), limit=None),
        bounce_type=_text(detail.get("bounceType")),
        bounce_sub_type=_text(detail.get("bounceSubType")),
        complaint_feedback_type=_text(detail.get("complaintFeedbackType")),
        reject_reason=_text(detail.get("reason")),
        delay_type=_text(detail.get("delayType")),
        ses_message_id=_text(ses_message_id),
    )


def _tracked_email_id(headers: object) -> str | None:
    """The email id from ``X-LFX-TRACKING-ID: <group_id>/<email_id>`` (the part
    after the last ``/``, or the whole value). None when absent or not a key."""
    if not isinstance(headers, list):
        return None
    wanted = TRACKING_HEADER.lower()
    for header in headers:
        if not isinstance(header, dict):
            continue
        name, value = header.get("name"), header.get("value")
        if isinstance(name, str) and name.strip().lower() == wanted and isinstance(value, str):
            email_id = value.strip().rpartition("/")[2]
            # An id that cannot be a KV key cannot have a record: nothing to wait for.
            return email_id if is_valid_key(email_id) else None
    return None


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 time as an aware UTC datetime; None when absent or unparseable."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def json_object(text: str) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object; ``None`` for anything else, however malformed or deep."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _text(value: object, limit: int | None = MAX_DETAIL_TEXT) -> str | None:
    """A non-empty string as a record may hold it (no lone surrogates, and cut
    to ``limit`` characters unless None), else None."""
    if not isinstance(value, str) or not value:
        return None
    return replace_lone_surrogates(value if limit is None else value[:limit])


# --- Applying an event -------------------------------------------------------


def apply_event(record: TrackingRecord, event: EngagementEvent, now: datetime) -> bool:
    """Change ``record`` as ``event`` says; whether anything changed.

    Idempotent: applying the same event again changes nothing, so a redelivered
    message is harmless. ``now`` stands in for an event without a usable time.
    """
    at = event.occurred_at or now
    match event.kind:
        case EventKind.DELIVERY:
            return _apply_delivery(record, at)
        case EventKind.OPEN:
            return _apply_open(record, event.event_id, at)
        case EventKind.CLICK:
            return _apply_click(record, event.event_id, event.link or "", at)
        case EventKind.BOUNCE:
            changed = _apply_failure(record, at)
            if record.bounce_type is None and event.bounce_type is not None:
                record.bounce_type = event.bounce_type
                record.bounce_sub_type = event.bounce_sub_type
                changed = True
            return changed
        case EventKind.COMPLAINT:
            changed = _apply_failure(record, at)
            if record.complaint_feedback_type is None and event.complaint_feedback_type:
                record.complaint_feedback_type = event.complaint_feedback_type
                changed = True
            return changed
        case EventKind.REJECT:
            changed = _apply_failure(record, at)
            if record.reject_reason is None and event.reject_reason is not None:
                record.reject_reason = event.reject_reason
                changed = True
            return changed
        case EventKind.DELIVERY_DELAY:
            return _apply_delay(record, event.delay_type, at)
        case EventKind.SEND:
            if record.ses_message_id is None and event.ses_message_id is not None:
                record.ses_message_id = event.ses_message_id
                return True
            return False


def _apply_delivery(record: TrackingRecord, at: datetime) -> bool:
    # The first delivery applied wins.
    if record.delivered:
        return False
    record.delivered = True
    record.delivered_at = at
    return True


def _apply_failure(record: TrackingRecord, at: datetime) -> bool:
    # The first failure applied (bounce, complaint or reject) wins.
    if record.failed:
        return False
    record.failed = True
    record.failed_at = at
    return True


def _apply_open(record: TrackingRecord, event_id: str, at: datetime) -> bool:
    # Replays are recognised among the kept entries only (the newest OPENS_KEPT).
    if any(opened.event_id == event_id for opened in record.opened_at_list):
        return False
    # The count stays exact once the list is capped (it then exceeds the list's length).
    record.open_count = max(record.open_count, len(record.opened_at_list)) + 1
    record.opened_at_list.append(OpenEvent(event_id=event_id, opened_at=at))
    del record.opened_at_list[:-OPENS_KEPT]
    record.opened = True
    record.last_opened_at = _later(record.last_opened_at, at)
    return True


def _apply_click(record: TrackingRecord, event_id: str, link: str, at: datetime) -> bool:
    if any(click.event_id == event_id for click in record.clicked_links):
        return False
    record.click_count = max(record.click_count, len(record.clicked_links)) + 1
    record.clicked_links.append(ClickEvent(event_id=event_id, link=link, clicked_at=at))
    del record.clicked_links[:-CLICKS_KEPT]
    record.clicked = True
    record.last_clicked_at = _later(record.last_clicked_at, at)
    return True


def _apply_delay(record: TrackingRecord, delay_type: str | None, at: datetime) -> bool:
    latest = _later(record.last_delayed_at, at)
    if record.delayed and latest == record.last_delayed_at:
        return False  # an older (or the same) delay: the latest one's type stays
    record.delayed = True
    record.last_delayed_at = latest
    record.delay_type = delay_type
    return True


def _later(current: datetime | None, candidate: datetime) -> datetime:
    """The later instant (compared as instants, whatever the offsets)."""
    if current is None:
        return candidate
    if current.tzinfo is None:
        current = current.replace(tzinfo=UTC)
    return candidate if candidate > current else current
