"""The public wire contract of emailrelay, as code.

This module is what callers import: the NATS subjects and queue group, the
JetStream KV bucket names, the request, reply and tracking-record models, and
the exact error strings. It depends on nothing else in emailrelay.

Field names and error strings are fixed by the relay this one replaces; do not
rename them. See ``docs/contract.md`` for the prose version.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, StrictInt, StrictStr

# --- NATS subjects -----------------------------------------------------------

QUEUE_GROUP = "lfx.email-service.queue"
SEND_EMAIL_SUBJECT = "lfx.email-service.send_email"
GET_EMAIL_STATUS_SUBJECT = "lfx.email-service.get_email_status"
GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT = "lfx.email-service.get_email_engagement_analytics"

DEADLINE_HEADER = "Emailrelay-Deadline"
"""Request header: when the caller stops waiting, as absolute Unix time in
milliseconds (an integer). The relay starts no SMTP transaction after it and
answers a send that arrives past it with ``email delivery failed`` (see
docs/contract.md, "Deadlines"). Without it the relay allows ``SEND_TIMEOUT``
from receipt."""

# --- JetStream KV ------------------------------------------------------------

RECIPIENTS_BUCKET = "email-recipients"
"""Key: ``email_id``; value: one :class:`TrackingRecord` as JSON."""

GROUP_INDEX_BUCKET = "email-group-index"
"""Key: ``group_id`` (see docs/contract.md for ids that are not valid keys);
value: a JSON array of ``email_id`` strings."""

TRACKING_HEADER = "X-LFX-TRACKING-ID"
"""``<group_id>/<email_id>`` on every tracked message; SES echoes it back in events."""

SES_CONFIGURATION_SET_HEADER = "X-SES-CONFIGURATION-SET"

# --- Error strings (the whole reply is ``{"error": <string>}``) -------------

ERR_INVALID_PAYLOAD = "invalid request payload"
ERR_SEND_FIELDS_REQUIRED = "to, subject, html, and text are required"
ERR_INVALID_TO = "invalid to address"
ERR_INVALID_FROM = "invalid from address"
ERR_FROM_DOMAIN_NOT_ALLOWED = "from address domain not allowed"
ERR_INVALID_REPLY_TO = "invalid reply_to address"
ERR_REPLY_TO_DOMAIN_NOT_ALLOWED = "reply_to address domain not allowed"
ERR_DELIVERY_FAILED = "email delivery failed"
ERR_STATUS_ID_REQUIRED = "email_id or group_id is required"
ERR_STATUS_ONE_ID_ONLY = "only one of email_id or group_id may be set"
ERR_GROUP_ID_REQUIRED = "group_id is required"
ERR_NOT_FOUND = "not found"
ERR_INTERNAL = "internal error"
ERR_GROUP_TOO_LARGE = "group too large for one reply, page with limit and offset"


# --- Models ------------------------------------------------------------------


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix, as the original relay wrote times."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


Timestamp = Annotated[datetime, PlainSerializer(format_time, return_type=str)]
"""A time that reads any RFC 3339 offset and always writes UTC with ``Z``."""


class _Request(BaseModel):
    # Unknown fields are ignored; wrong JSON types are rejected, not coerced.
    model_config = ConfigDict(extra="ignore", strict=True)


class SendEmailRequest(_Request):
    """``lfx.email-service.send_email``. Empty strings mean "absent"."""

    to: StrictStr = ""
    subject: StrictStr = ""
    html: StrictStr = ""
    text: StrictStr = ""
    from_: StrictStr = Field(default="", alias="from")
    from_display_name: StrictStr = ""
    reply_to: StrictStr = ""
    group_id: StrictStr = ""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class SendEmailReply(BaseModel):
    """Both ids are empty when the send was skipped on purpose (disabled, or a
    recipient outside ``SMTP_ALLOWED_RECIPIENT_DOMAINS``)."""

    email_id: str
    group_id: str


class GetEmailStatusRequest(_Request):
    """``lfx.email-service.get_email_status``: exactly one of the two ids.

    ``limit`` (1 to :data:`MAX_STATUS_PAGE`) and ``offset`` (>= 0) page a group
    reply (an addition): the records at index positions ``offset`` to
    ``offset + limit``. ``0`` means absent for both; ``offset`` without
    ``limit`` pages with ``limit`` = :data:`MAX_STATUS_PAGE`.
    """

    email_id: StrictStr = ""
    group_id: StrictStr = ""
    limit: StrictInt = 0
    offset: StrictInt = 0


MAX_STATUS_PAGE = 1000


class GetEngagementAnalyticsRequest(_Request):
    """``lfx.email-service.get_email_engagement_analytics``."""

    group_id: StrictStr = ""


class EngagementAnalyticsReply(BaseModel):
    group_id: str
    total_sent: StrictInt
    delivered: StrictInt
    opened: StrictInt
    unique_opened: StrictInt
    failed: StrictInt


class ErrorReply(BaseModel):
    error: str


class OpenEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    event_id: str
    opened_at: Timestamp


class ClickEvent(BaseModel):
    """One click on a tracked link (an addition; see docs/engagement.md)."""

    model_config = ConfigDict(extra="allow")

    event_id: str
    link: str
    clicked_at: Timestamp


class TrackingRecord(BaseModel):
    """One sent email in ``email-recipients``.

    Unset optional fields are omitted on the wire (see :meth:`to_json`), and
    fields this version does not know (written by a newer or older relay) are
    kept through read-modify-write cycles.
    """

    model_config = ConfigDict(extra="allow")

    group_id: str
    email_id: str
    to: str
    subject: str
    sent_at: Timestamp
    delivered: bool = False
    delivered_at: Timestamp | None = None
    opened: bool = False
    open_count: int = 0
    opened_at_list: list[OpenEvent] = Field(default_factory=list)
    last_opened_at: Timestamp | None = None
    failed: bool = False
    failed_at: Timestamp | None = None
    # Additions beyond the original relay (docs/engagement.md), omitted while unset.
    clicked: bool = False
    click_count: int = 0
    last_clicked_at: Timestamp | None = None
    clicked_links: list[ClickEvent] = Field(default_factory=list)
    bounce_type: str | None = None
    bounce_sub_type: str | None = None
    complaint_feedback_type: str | None = None
    reject_reason: str | None = None
    delayed: bool = False
    last_delayed_at: Timestamp | None = None
    delay_type: str | None = None
    ses_message_id: str | None = None

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude=self._unset_optional_fields()).encode()

    def _unset_optional_fields(self) -> set[str]:
        omitted = {name for name, value in self if value is None}
        if not self.opened_at_list:
            omitted.add("opened_at_list")
        # The added flags and counters are absent, not false/0, until an event sets them.
        if not self.clicked:
            omitted.add("clicked")
        if not self.click_count:
            omitted.add("click_count")
        if not self.clicked_links:
            omitted.add("clicked_links")
        if not self.delayed:
            omitted.add("delayed")
        return omitted
