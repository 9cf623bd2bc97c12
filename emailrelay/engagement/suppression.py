"""Which recipients an SES event suppresses. Pure functions, no I/O.

Only events that say a recipient must not be mailed again suppress it: a
``Permanent`` bounce (the address does not exist or refuses mail for good)
and a complaint (the recipient marked the mail as spam). A ``Transient`` or
``Undetermined`` bounce does not: the next message may well arrive. Only the
recipients the event names are suppressed (``bouncedRecipients``,
``complainedRecipients``), never every address in ``mail.destination``: a
message to three people that bounced for one must not silence the other two.

Unlike tracking updates this needs no tracking header: a bounce of a message
sent by another system on the same SES configuration set still tells the
truth about the address.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from emailrelay.engagement.events import json_object, parse_time
from emailrelay.store.suppressions import Suppression, SuppressionReason

_RECIPIENT_DETAILS = ("status", "action", "diagnosticCode")


def suppressions_from_message(body: str, now: datetime) -> list[Suppression]:
    """The suppressions in one SQS message body: an SNS notification whose
    ``Message`` is the SES event, or the SES event itself (raw delivery)."""
    outer = json_object(body)
    if outer is None:
        return []
    if "eventType" in outer or "notificationType" in outer:
        return suppressions_from_event(outer, now)
    message = outer.get("Message")
    inner = json_object(message) if isinstance(message, str) else None
    return [] if inner is None else suppressions_from_event(inner, now)


def suppressions_from_event(event: dict[str, Any], now: datetime) -> list[Suppression]:
    """The suppressions one SES event (event publishing or an identity
    notification) implies; the time is the event's own, else ``now``."""
    type_name = event.get("eventType", event.get("notificationType"))
    if not isinstance(type_name, str):
        return []
    kind = type_name.strip().lower()
    mail = event.get("mail")
    summary: dict[str, str] = {"event_type": type_name.strip()}
    if isinstance(mail, dict) and isinstance(mail.get("messageId"), str):
        summary["ses_message_id"] = mail["messageId"]
    if kind == "bounce":
        detail, reason, listed = event.get("bounce"), SuppressionReason.BOUNCE, "bouncedRecipients"
        if not isinstance(detail, dict) or detail.get("bounceType") != "Permanent":
            return []
        fields = ("bounceType", "bounceSubType", "feedbackId")
    elif kind == "complaint":
        detail, reason, listed = (
            event.get("complaint"),
            SuppressionReason.COMPLAINT,
            ("complainedRecipients"),
        )
        if not isinstance(detail, dict):
            return []
        fields = ("complaintFeedbackType", "complaintSubType", "feedbackId")
    else:
        return []
    for name in fields:
        if isinstance(detail.get(name), str):
            summary[name] = detail[name]
    at = parse_time(detail.get("timestamp")) or now
    recipients = detail.get(listed)
    found: list[Suppression] = []
    for recipient in recipients if isinstance(recipients, list) else []:
        if not isinstance(recipient, dict):
            continue
        address = recipient.get("emailAddress")
        if not isinstance(address, str) or not address.strip():
            continue
        own = {
            name: recipient[name]
            for name in _RECIPIENT_DETAILS
            if isinstance(recipient.get(name), str)
        }
        found.append(Suppression(address.strip(), reason, at, {**summary, **own}))
    return found
