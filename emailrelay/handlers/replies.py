"""Request decoding and reply encoding shared by every handler."""

from __future__ import annotations

import json
from typing import Any, TypeVar

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


def reply(model: BaseModel) -> bytes:
    return model.model_dump_json(by_alias=True).encode()


def error_reply(message: str) -> bytes:
    return reply(api.ErrorReply(error=message))
