"""SES engagement events for the dev stack, built from a captured message.

Shaped field for field like the events Amazon SES publishes (the AWS examples
in ``tests/data/ses-event-examples.json``): an SES event-publishing record
(``eventType``, ``mail`` with the message's own headers, and the type's detail
object), wrapped in the SNS notification that SQS delivers. The relay then
reads them with the same :func:`emailrelay.engagement.parse_message` and
applies them with the same :func:`emailrelay.engagement.apply_event` as in
production, so nothing here knows how a record changes.
"""

from __future__ import annotations

import enum
import json
import uuid
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

# What the dev stack's SMTP capture answers; SES reports the provider's reply.
SMTP_RESPONSE = "250 Message accepted for delivery"
REPORTING_MTA = "emailrelay-dev-capture"
USER_AGENT = "emailrelay dev"
ACCOUNT = "000000000000"
REGION = "us-east-1"


class DevEvent(enum.StrEnum):
    """The events ``emailrelay dev event`` makes (the value is SES's ``eventType``)."""

    DELIVERY = "Delivery"
    OPEN = "Open"
    CLICK = "Click"
    BOUNCE = "Bounce"
    COMPLAINT = "Complaint"


BOUNCE_TYPES = ("Permanent", "Transient", "Undetermined")


def ses_event(
    kind: DevEvent,
    raw_message: bytes,
    *,
    now: datetime | None = None,
    link: str = "https://example.com/",
    bounce_type: str = "Permanent",
) -> dict[str, Any]:
    """The SES event record for ``raw_message`` (the bytes the relay sent)."""
    now = now or datetime.now(UTC)
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw_message)
    recipients = [address for _, address in getaddresses(headers.get_all("To", [])) if address]
    senders = [address for _, address in getaddresses(headers.get_all("From", [])) if address]
    sent_at = _date(headers.get("Date")) or now
    message_id = str(headers.get("Message-ID", "")).strip().strip("<>") or str(uuid.uuid4())
    mail = {
        "timestamp": _time(sent_at),
        "source": senders[0] if senders else "",
        "sourceArn": f"arn:aws:ses:{REGION}:{ACCOUNT}:identity/{_domain(senders)}",
        "sendingAccountId": ACCOUNT,
        "messageId": message_id,
        "destination": recipients,
        "headersTruncated": False,
        # Raw values, unfolded, as SES echoes them (the tracking header among them).
        "headers": [
            {"name": name, "value": _unfold(str(value))} for name, value in headers.items()
        ],
        "commonHeaders": {
            "from": [_unfold(str(v)) for v in headers.get_all("From", [])],
            "to": [_unfold(str(v)) for v in headers.get_all("To", [])],
            "messageId": message_id,
            "subject": _unfold(str(headers.get("Subject", ""))),
        },
    }
    at = _time(now)
    detail: dict[str, Any]
    match kind:
        case DevEvent.DELIVERY:
            elapsed = max(0, int((now - sent_at).total_seconds() * 1000))
            detail = {
                "timestamp": at,
                "processingTimeMillis": elapsed,
                "recipients": recipients,
                "smtpResponse": SMTP_RESPONSE,
                "reportingMTA": REPORTING_MTA,
            }
        case DevEvent.OPEN:
            detail = {"ipAddress": "127.0.0.1", "timestamp": at, "userAgent": USER_AGENT}
        case DevEvent.CLICK:
            detail = {
                "ipAddress": "127.0.0.1",
                "link": link,
                "linkTags": {},
                "timestamp": at,
                "userAgent": USER_AGENT,
            }
        case DevEvent.BOUNCE:
            permanent = bounce_type == "Permanent"
            detail = {
                "bounceType": bounce_type,
                "bounceSubType": "General",
                "bouncedRecipients": [
                    {
                        "emailAddress": address,
                        "action": "failed",
                        "status": "5.1.1" if permanent else "4.4.7",
                        "diagnosticCode": "smtp; 550 5.1.1 user unknown"
                        if permanent
                        else "smtp; 421 4.4.7 message expired",
                    }
                    for address in recipients
                ],
                "timestamp": at,
                "feedbackId": str(uuid.uuid4()),
                "reportingMTA": f"dsn; {REPORTING_MTA}",
            }
        case DevEvent.COMPLAINT:
            detail = {
                "complainedRecipients": [{"emailAddress": address} for address in recipients],
                "timestamp": at,
                "feedbackId": str(uuid.uuid4()),
                "userAgent": USER_AGENT,
                "complaintFeedbackType": "abuse",
                "arrivalDate": at,
            }
    return {"eventType": kind.value, "mail": mail, kind.value.lower(): detail}


def sns_notification(event: dict[str, Any], *, now: datetime | None = None) -> str:
    """The SQS message body SNS delivers for ``event`` (raw delivery off).

    Its ``MessageId`` is new each time: the relay dedupes opens and clicks on
    it, so every call is a distinct event, as a second open by a person is."""
    now = now or datetime.now(UTC)
    topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:emailrelay-dev"
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": topic,
            "Message": json.dumps(event),
            "Timestamp": _time(now),
            "SignatureVersion": "1",
            "Signature": "emailrelay-dev-unsigned",
            "SigningCertURL": "",
            "UnsubscribeURL": "",
        }
    )


def _time(value: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as SES writes times."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _date(value: object) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(str(value)) if value else None
    except (TypeError, ValueError):
        return None
    if parsed is not None and parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _unfold(value: str) -> str:
    return value.replace("\r\n", "").replace("\n", "")


def _domain(addresses: list[str]) -> str:
    return addresses[0].rpartition("@")[2] if addresses else ""
