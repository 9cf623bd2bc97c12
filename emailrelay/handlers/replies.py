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


Reply: TypeAlias = (
    api.ErrorReply
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
    if isinstance(reply, api.TrackingRecord):
        # As stored: shortened to the record budget, times with a Z suffix.
        return reply.to_json()
    return reply.model_dump_json(by_alias=True).encode()


def error_reply(error: str) -> api.ErrorReply:
    return api.ErrorReply(error=error)
