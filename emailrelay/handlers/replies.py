"""Request decoding and reply encoding shared by every handler."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from emailrelay import api

RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(data: bytes, model: type[RequestT]) -> RequestT | None:
    """The request as ``model``, or ``None`` when the body is not a JSON object
    or a known field has the wrong JSON type. A ``null`` field counts as absent,
    as it did for the replaced relay."""
    try:
        body: Any = json.loads(data)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    try:
        return model.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError:
        return None


def reply(model: BaseModel) -> bytes:
    return model.model_dump_json(by_alias=True).encode()


def error_reply(message: str) -> bytes:
    return reply(api.ErrorReply(error=message))
