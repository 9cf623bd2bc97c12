"""The public wire contract of emailrelay, as code.

This module is what callers import: the NATS subjects and queue group, the
JetStream KV bucket names, the request, reply and tracking-record models, and
the exact error strings. It depends on nothing else in emailrelay.

Field names and error strings are fixed by the relay this one replaces; do not
rename them. See ``docs/contract.md`` for the prose version.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    StrictStr,
)

# --- NATS subjects -----------------------------------------------------------

DEFAULT_NATS_URL = "nats://localhost:4222"
"""Where the relay, the client and the CLI look for NATS when told nothing
(the replaced relay's ``NATS_URL`` default)."""

QUEUE_GROUP = "lfx.email-service.queue"
SEND_EMAIL_SUBJECT = "lfx.email-service.send_email"
GET_EMAIL_STATUS_SUBJECT = "lfx.email-service.get_email_status"
GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT = "lfx.email-service.get_email_engagement_analytics"

SUPPRESSION_GET_SUBJECT = "lfx.email-service.suppression.get"
"""An addition, served only where ``SUPPRESSION_ENABLED=true``: one address's
suppression (:class:`SuppressionAddressRequest` in, :class:`SuppressionEntry`
out, ``not found`` when it is not suppressed)."""
SUPPRESSION_LIST_SUBJECT = "lfx.email-service.suppression.list"
"""An addition: suppressed addresses, paged (:class:`SuppressionListRequest`
in, :class:`SuppressionListReply` out)."""
SUPPRESSION_ADD_SUBJECT = "lfx.email-service.suppression.add"
"""An addition: suppress an address by hand (:class:`SuppressionAddressRequest`
in, :class:`SuppressionChangeReply` out)."""
SUPPRESSION_REMOVE_SUBJECT = "lfx.email-service.suppression.remove"
"""An addition: allow sending to an address again (:class:`SuppressionAddressRequest`
in, :class:`SuppressionChangeReply` out)."""
ERASE_RECIPIENT_DATA_SUBJECT = "lfx.email-service.erase_recipient_data"
"""An addition, served wherever status is: remove every tracking record
addressed to one recipient and their ids from every group index
(:class:`EraseRecipientDataRequest` in, :class:`EraseRecipientDataReply`
out). It destroys data: grant it explicitly, never through a wildcard."""
SUPPRESSION_SUBJECTS = (
    SUPPRESSION_GET_SUBJECT,
    SUPPRESSION_LIST_SUBJECT,
    SUPPRESSION_ADD_SUBJECT,
    SUPPRESSION_REMOVE_SUBJECT,
)

READ_SUBJECTS = frozenset(
    {
        GET_EMAIL_STATUS_SUBJECT,
        GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT,
        SUPPRESSION_GET_SUBJECT,
        SUPPRESSION_LIST_SUBJECT,
    }
)
"""The subjects that only read. They have their own budget
(``MAX_READS_IN_FLIGHT``) and are never paused by a full send backlog; a read
beyond the budget answers ``overloaded`` (see docs/contract.md, "Overload")."""

DEADLINE_HEADER = "Emailrelay-Deadline"
"""Request header: when the caller stops waiting, as absolute Unix time in
milliseconds (an integer). The relay starts no SMTP transaction after it and
answers a send that arrives past it with ``email delivery failed`` (see
docs/contract.md, "Deadlines"). Without it the relay allows ``SEND_TIMEOUT``
from receipt."""

ERROR_DETAIL_HEADER = "Emailrelay-Error-Detail"
"""Reply header (an addition) on some error replies: what the relay knows
that would help the caller (``allowed: lfx.linuxfoundation.org``), for
people; the body keeps the exact contract string, which programs match."""

IDEMPOTENT_REPLAY_HEADER = "Emailrelay-Idempotent-Replay"
"""Reply header (an addition): ``true`` on the reply to a send whose
idempotency key had already sent; the body is the first send's reply."""

# --- JetStream stream of engagement events -----------------------------------

EVENTS_STREAM = "EMAIL_EVENTS"
"""An addition (``EVENTS_STREAM_ENABLED=true``): every outcome of a sent email,
once, as one :class:`EmailEvent` per message (docs/contract.md, "Engagement
events on NATS")."""

EVENTS_SUBJECT_PREFIX = "lfx.email-service.events"
EVENTS_SUBJECTS = EVENTS_SUBJECT_PREFIX + ".>"
"""The stream's subjects: ``lfx.email-service.events.<type>``."""

EVENT_TYPES = (
    "sent",
    "delivered",
    "opened",
    "clicked",
    "bounced",
    "complained",
    "delayed",
    "rejected",
)
"""Every ``type`` an :class:`EmailEvent` has: ``sent`` when the provider
accepted the message (the send path), the rest from SES events."""

MSG_ID_HEADER = "Nats-Msg-Id"
"""JetStream's de-duplication header; an event carries its ``event_id`` in it."""


def events_subject(event_type: str) -> str:
    """The subject an event of ``event_type`` is published on."""
    return f"{EVENTS_SUBJECT_PREFIX}.{event_type}"


# --- JetStream KV ------------------------------------------------------------

RECIPIENTS_BUCKET = "email-recipients"
"""Key: ``email_id``; value: one :class:`TrackingRecord` as JSON."""

RECORD_MAX_BYTES = 64 * 1024
"""The ``email-recipients`` bucket's value limit (the deployment's setting)."""

GROUP_INDEX_BUCKET = "email-group-index"
"""Key: ``group_id`` (see docs/contract.md for ids that are not valid keys);
value: a JSON array of ``email_id`` strings."""

TRACKING_HEADER = "X-LFX-TRACKING-ID"
"""``<group_id>/<email_id>`` on every tracked message; SES echoes it back in events."""

SES_CONFIGURATION_SET_HEADER = "X-SES-CONFIGURATION-SET"

IDEMPOTENCY_HEADER = "Idempotency-Key"
"""Request header (an addition): the same as the ``idempotency_key`` field."""

IDEMPOTENCY_BUCKET = "email-idempotency"
"""Key: SHA-256 of a caller's idempotency key (base64url); value: the
reservation and, once known, the reply (see emailrelay.store.idempotency)."""

RECIPIENT_INDEX_BUCKET = "email-recipient-index"
"""Key: SHA-256 of a lower-cased bare recipient address (base64url), as in
``email-suppressions``; value: the ids of the records addressed to it,
paged like the group index (an addition: what an erasure starts from)."""

SUPPRESSIONS_BUCKET = "email-suppressions"
"""Key: SHA-256 of a lower-cased recipient address (base64url); value: why
and since when it is suppressed (see emailrelay.store.suppressions)."""

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
ERR_IDEMPOTENCY_KEY_REUSED = "idempotency key reused with a different request"
ERR_DELIVERY_OUTCOME_UNKNOWN = "email delivery outcome unknown"
ERR_RECIPIENT_SUPPRESSED = "recipient suppressed"
ERR_GROUP_TOO_LARGE = "group too large for one reply, page with limit and offset"
ERR_ADDRESS_REQUIRED = "address is required"
ERR_INVALID_ADDRESS = "invalid address"
ERR_OVERLOADED = "overloaded"
"""An addition: a read (:data:`READ_SUBJECTS`) arrived while the relay
already held twice ``MAX_READS_IN_FLIGHT`` of them (running and waiting), or
a suppression list page ran out of time; nothing was answered from the store.
Retry after a pause."""
ERR_RECIPIENT_REQUIRED = "recipient is required"
ERR_ERASURE_INCOMPLETE = "erasure incomplete, safe to repeat"

CONTRACT_ERRORS = frozenset(
    {
        ERR_INVALID_PAYLOAD,
        ERR_SEND_FIELDS_REQUIRED,
        ERR_INVALID_TO,
        ERR_INVALID_FROM,
        ERR_FROM_DOMAIN_NOT_ALLOWED,
        ERR_INVALID_REPLY_TO,
        ERR_REPLY_TO_DOMAIN_NOT_ALLOWED,
        ERR_DELIVERY_FAILED,
        ERR_STATUS_ID_REQUIRED,
        ERR_STATUS_ONE_ID_ONLY,
        ERR_GROUP_ID_REQUIRED,
        ERR_NOT_FOUND,
        ERR_INTERNAL,
        ERR_GROUP_TOO_LARGE,
        ERR_IDEMPOTENCY_KEY_REUSED,
        ERR_DELIVERY_OUTCOME_UNKNOWN,
        ERR_RECIPIENT_SUPPRESSED,
        ERR_ADDRESS_REQUIRED,
        ERR_INVALID_ADDRESS,
        ERR_OVERLOADED,
        ERR_RECIPIENT_REQUIRED,
        ERR_ERASURE_INCOMPLETE,
    }
)
"""Every error string of the contract (a small fixed set: safe as a metric label)."""

SERVICE_ERROR_CODES = {
    ERR_NOT_FOUND: "404",
    ERR_DELIVERY_FAILED: "502",
    ERR_INTERNAL: "500",
    ERR_DELIVERY_OUTCOME_UNKNOWN: "502",
    ERR_OVERLOADED: "503",
    ERR_ERASURE_INCOMPLETE: "500",
}
"""HTTP-like ``Nats-Service-Error-Code`` values, as NATS services use them:
no such record (404), the provider refused (502), too busy to read (503),
anything else of ours (500);
every other error is the caller's mistake (400, see :func:`service_error_code`)."""


def service_error_code(error: str) -> str:
    """The ``Nats-Service-Error-Code`` for a contract error string."""
    return SERVICE_ERROR_CODES.get(error, "400")


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
    idempotency_key: StrictStr = ""
    """An addition: at most :data:`MAX_IDEMPOTENCY_KEY_CHARS` characters; the
    same as the :data:`IDEMPOTENCY_HEADER` header (both set and different is
    an ``invalid request payload``), compared trimmed; only whitespace, or a
    blank header, is an ``invalid request payload``. A retry with the same key and the same
    request gets the first reply, and never sends a second message."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


MAX_IDEMPOTENCY_KEY_CHARS = 256

MAX_GROUP_ID_BYTES = 16 * 1024
"""A longer ``group_id`` (UTF-8) is an ``invalid request payload``: the record
keeps the id whole, so it must be bounded for the record to fit its 64 KiB
bucket value. Ids too long to be a KV key (over 962 characters) still work:
their key is hashed. No id the replaced relay could store is longer than 942
bytes (docs/contract.md)."""


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
    clicked: StrictInt = 0
    """An addition: every click (a relay without it answers no such field)."""
    unique_clicked: StrictInt = 0
    """An addition: emails clicked at least once."""


class ErrorReply(BaseModel):
    """The reply to a request that failed: ``{"error": <one of the ERR_* strings>}``.

    Handlers return it as a value (never raise it); the server knows an error
    reply by this type and adds the NATS service error headers."""

    error: str
    detail: str = Field(default="", exclude=True)
    """Advice for people, sent as :data:`ERROR_DETAIL_HEADER`, never in the body."""

    def __eq__(self, other: object) -> bool:
        """Equal when the caller reads the same reply body: ``detail`` is advice
        in a header, not part of the contract's answer."""
        return isinstance(other, ErrorReply) and other.error == self.error

    __hash__ = None  # type: ignore[assignment]

    @property
    def service_code(self) -> str:
        return service_error_code(self.error)


class SuppressionAddressRequest(_Request):
    """``suppression.get`` / ``.add`` / ``.remove``: one recipient address
    (compared case-insensitively, ``Name <a@b>`` counts as ``a@b``)."""

    address: StrictStr = ""


class SuppressionListRequest(_Request):
    """``suppression.list``: ``limit`` (1 to :data:`MAX_SUPPRESSION_PAGE`,
    0 = 100) entries from ``offset``, in a stable order."""

    limit: StrictInt = 0
    offset: StrictInt = 0


MAX_SUPPRESSION_PAGE = 1000
DEFAULT_SUPPRESSION_PAGE = 100


class SuppressionEntry(BaseModel):
    """One suppressed recipient: the address as first seen, why (``bounce``,
    ``complaint``, ``manual``), since when, and what the SES event said."""

    address: str
    reason: str
    suppressed_at: Timestamp
    event: dict[str, str] = Field(default_factory=dict)


class SuppressionListReply(BaseModel):
    """A page of the list; ``next_offset`` is ``null`` on the last page."""

    suppressions: list[SuppressionEntry]
    offset: int
    limit: int
    next_offset: int | None


class SuppressionChangeReply(BaseModel):
    """``changed`` is false when the add or remove found nothing to do."""

    address: str
    changed: bool


class EraseRecipientDataRequest(_Request):
    """``erase_recipient_data``: one recipient (one mailbox; compared as a
    bare address, case-insensitively). ``suppression``: erase its
    suppression-list entry too (kept by default: it is the do-not-contact record)."""

    recipient: StrictStr = ""
    suppression: StrictBool = False


class EraseRecipientDataReply(BaseModel):
    """What this erasure removed; both 0 when there was nothing (left) to erase."""

    erased_records: int
    erased_index_entries: int


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


class EmailEvent(BaseModel):
    """One message of the ``EMAIL_EVENTS`` stream: one outcome of one email.

    ``event_id`` is derived from the event, never random (``sent:<email_id>``;
    for SES events a hash of the SES message id, the type, the event's own
    timestamp and the recipient), so the same event arriving twice has one id:
    it travels as :data:`MSG_ID_HEADER` and the stream drops the copy. Fields
    that do not apply to a type are absent, never null; fields this version
    does not know are kept (a newer relay may add some)."""

    model_config = ConfigDict(extra="allow")

    event_id: str
    type: str
    """One of :data:`EVENT_TYPES`; also the last token of the subject."""
    email_id: str
    group_id: str
    recipient: str
    """The bare address (``a@example.org``), as the record's ``to`` names it."""
    occurred_at: Timestamp
    """The provider's time where it gives one (SES's detail timestamp), else
    the relay's: ``sent_at`` for ``sent``, the time of processing otherwise."""
    bounce_type: str | None = None
    bounce_sub_type: str | None = None
    complaint_feedback_type: str | None = None
    link: str | None = None
    ses_message_id: str | None = None

    def to_json(self) -> bytes:
        """The message body: unset optional fields left out."""
        return self.model_dump_json(exclude_none=True).encode()


OPENS_KEPT = 100
"""``opened_at_list`` keeps its newest entries up to this many; ``open_count`` stays exact."""
CLICKS_KEPT = 100
"""``clicked_links`` keeps its newest entries up to this many; ``click_count`` stays exact."""
RECORD_BUDGET = RECORD_MAX_BYTES - 1024
"""What :meth:`TrackingRecord.to_json` writes at most: the bucket's limit less
room for the headers of a revision-checked write, which count against it."""
KEPT_TEXT_BYTES = 1024
"""``to`` is cut to this when a record must shrink, and ``subject`` never below it."""
SHORTENED_MARK = "…"


class TrackingRecord(BaseModel):
    """One sent email in ``email-recipients``.

    Unset optional fields are omitted on the wire (see :meth:`to_json`), and
    fields this version does not know (written by a newer or older relay) are
    kept through read-modify-write cycles. The JSON is never larger than
    :data:`RECORD_BUDGET` when it can be helped (see :meth:`to_json`).
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
        """The record as stored, shortened to fit :data:`RECORD_BUDGET`.

        Only what the contract allows gives way, in this order: the open and
        click lists keep their newest :data:`OPENS_KEPT` / :data:`CLICKS_KEPT`
        entries; ``to`` is cut to :data:`KEPT_TEXT_BYTES`; ``subject`` is cut
        to what fits, but not below :data:`KEPT_TEXT_BYTES`; then the oldest
        list entries go until it fits. Counts, ids and times are never
        touched. A record whose other fields alone are too big (fields of a
        newer relay) is returned as it is, and the store refuses it.
        """
        encoded = self._encode()
        if (
            len(encoded) <= RECORD_BUDGET
            and len(self.opened_at_list) <= OPENS_KEPT
            and len(self.clicked_links) <= CLICKS_KEPT
        ):
            return encoded
        return self._fitted()._encode()

    def _encode(self) -> bytes:
        return self.model_dump_json(exclude=self._unset_optional_fields()).encode()

    def _fitted(self) -> TrackingRecord:
        record = self.model_copy(
            update={
                "opened_at_list": self.opened_at_list[-OPENS_KEPT:],
                "clicked_links": self.clicked_links[-CLICKS_KEPT:],
            }
        )
        if len(record._encode()) <= RECORD_BUDGET:
            return record
        record.to = _shorten_json_text(record.to, KEPT_TEXT_BYTES)
        others = len(record.model_copy(update={"subject": ""})._encode())
        room = RECORD_BUDGET - others
        subject = record.subject
        while True:
            record.subject = _shorten_json_text(subject, max(room, KEPT_TEXT_BYTES))
            excess = len(record._encode()) - RECORD_BUDGET
            if excess <= 0 or room <= KEPT_TEXT_BYTES:
                break
            room -= excess  # the estimate and the encoder differed; rarely runs
        while excess > 0 and (record.opened_at_list or record.clicked_links):
            # The oldest entry of either list goes first (each list is in arrival order).
            opens, clicks = record.opened_at_list, record.clicked_links
            if clicks and (not opens or _utc(clicks[0].clicked_at) < _utc(opens[0].opened_at)):
                excess -= len(clicks[0].model_dump_json()) + 1
                record.clicked_links = clicks[1:]
            else:
                excess -= len(opens[0].model_dump_json()) + 1
                record.opened_at_list = opens[1:]
            if excess <= 0:
                excess = len(record._encode()) - RECORD_BUDGET
        return record

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


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _json_bytes(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")) - 2


def _shorten_json_text(text: str, max_bytes: int) -> str:
    """``text`` cut (marked with :data:`SHORTENED_MARK`) so that its JSON
    string body takes at most ``max_bytes``; unchanged when it fits already."""
    if len(text) <= max_bytes and _json_bytes(text) <= max_bytes:
        return text
    # Every character takes at least one byte: no longer prefix can fit.
    budget = max_bytes - _json_bytes(SHORTENED_MARK)
    low, high = 0, min(len(text), budget)
    while low < high:  # the longest prefix that fits, by bisection
        middle = (low + high + 1) // 2
        if _json_bytes(text[:middle]) <= budget:
            low = middle
        else:
            high = middle - 1
    return text[:low] + SHORTENED_MARK
