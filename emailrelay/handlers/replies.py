"""Request decoding and reply encoding shared by every handler.

A handler returns a typed :data:`Reply`; the request loop
(:mod:`emailrelay.server`) encodes it once, with :func:`encode_reply`, and
knows an error by its type (:class:`emailrelay.api.ErrorReply`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from pydantic import BaseModel, ValidationError

from emailrelay import api
from emailrelay.addresses import replace_lone_surrogates

RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(data: bytes, model: type[RequestT]) -> RequestT | None:
    """The request as ``model``, or ``None`` when the body is not a JSON object
    or a known field has the wrong JSON type. A ``null`` field counts as absent,
    as it did for the replaced relay.

    Caller mistakes stay caller mistakes: JSON nested deeper than the parser
    recurses is not a JSON object we can read (``None``), and a lone surrogate
    escape (``"\\ud800"``), which no UTF-8 encoder accepts later, becomes
    U+FFFD in every string field."""
    try:
        body: Any = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    fields = {
        k: replace_lone_surrogates(v) if isinstance(v, str) else v
        for k, v in body.items()
        if v is not None
    }
    try:
        return model.model_validate(fields)
    except ValidationError:
        return None


@dataclass(frozen=True)
class EncodedRecords:
    """A group's records, answered as one JSON array. Each record is already
    encoded: the status handler measured it against the reply limit as it
    read it, and encoding the largest replies twice would double their cost."""

    records: Sequence[bytes]


@dataclass(frozen=True)
class Replayed:
    """A send's first reply, answered again to a repeated idempotency key: the
    same body, marked with :data:`emailrelay.api.IDEMPOTENT_REPLAY_HEADER`."""

    reply: api.SendEmailReply


Reply: TypeAlias = (
    api.ErrorReply
    | Replayed
    | api.SendEmailReply
    | api.TrackingRecord
    | api.EngagementAnalyticsReply
    | api.SuppressionEntry
    | api.SuppressionListReply
    | api.SuppressionChangeReply
    | api.EraseRecipientDataReply
    | EncodedRecords
)
"""What a handler answers: a contract model, or an error value."""


def encode_reply(reply: Reply) -> bytes:
    """The reply body on the wire."""
    if isinstance(reply, EncodedRecords):
        return b"[" + b",".join(reply.records) + b"]"
    if isinstance(reply, Replayed):
        reply = reply.reply
    if isinstance(reply, api.TrackingRecord):
        # As stored: shortened to the record budget, times with a Z suffix.
        return reply.to_json()
    return reply.model_dump_json(by_alias=True).encode()


def reply_headers(reply: Reply) -> dict[str, str]:
    """The additions' reply headers (docs/contract.md): an error's detail, a
    replayed send's mark. Empty for most replies."""
    if isinstance(reply, Replayed):
        return {api.IDEMPOTENT_REPLAY_HEADER: "true"}
    if isinstance(reply, api.ErrorReply) and reply.detail:
        return {api.ERROR_DETAIL_HEADER: _header_value(reply.detail)}
    return {}


def _header_value(text: str) -> str:
    """One line of printable ASCII: a header value nats-py can always send
    (a reply that cannot be sent would leave its caller waiting)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


NO_RECORD = "no tracking record has this email_id (an id as the send reply gave it)"
NO_GROUP = "no email is tracked under this group_id"
NOT_SUPPRESSED = "the address is not on the suppression list"
"""``not found`` details (:data:`emailrelay.api.ERROR_DETAIL_HEADER`)."""


def error_reply(error: str, detail: str = "") -> api.ErrorReply:
    """``detail``: advice for people, sent as a header (never in the body)."""
    return api.ErrorReply(error=error, detail=detail)
