"""The idempotency key a send request carries, in the ``idempotency_key``
field and/or the ``Idempotency-Key`` header (which nats-py hands over
trimmed): pure rules of :func:`decide_send`, no store and no loop. End to end
in tests/test_idempotency_e2e.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from emailrelay import api
from emailrelay.handlers.send_decision import NewIds, Send, decide_send
from tests.support.send_requests import RULES, send_request

IDS = NewIds(email_id="email-1", group_id="group-1")
NOW = datetime(2024, 5, 1, tzinfo=UTC)
INVALID = api.ErrorReply(error=api.ERR_INVALID_PAYLOAD)


def key_of(field: str | None, header: str | None) -> str | api.ErrorReply:
    """The key the send reserves (``""``: unkeyed), or the error reply."""
    body = send_request(idempotency_key=field)
    decision = decide_send(json.dumps(body).encode(), RULES, IDS, NOW, header)
    if isinstance(decision, api.ErrorReply):
        return decision
    assert isinstance(decision, Send)
    return "" if decision.idempotency is None else decision.idempotency.key


def test_a_padded_field_equals_the_trimmed_header() -> None:
    assert key_of("order 7 ", "order 7") == "order 7"


def test_a_padded_field_alone_is_the_trimmed_key() -> None:
    assert key_of("  order 7 ", None) == key_of(None, "order 7") == "order 7"


def test_a_blank_header_is_an_invalid_payload() -> None:
    assert key_of(None, "") == INVALID
    assert key_of(None, "   ") == INVALID


def test_a_blank_header_beside_a_field_is_an_invalid_payload() -> None:
    assert key_of("order 7", "") == INVALID


def test_a_field_of_only_whitespace_is_an_invalid_payload() -> None:
    assert key_of(" \t ", None) == INVALID


def test_an_empty_field_means_no_key() -> None:
    assert key_of("", None) == ""


def test_an_empty_field_with_a_header_takes_the_header() -> None:
    assert key_of("", "order 7") == "order 7"


def test_field_and_header_that_differ_after_trimming_are_an_invalid_payload() -> None:
    assert key_of("order 7 ", "order 8") == INVALID


def test_the_length_bound_applies_to_the_trimmed_key() -> None:
    assert key_of(" " + "k" * api.MAX_IDEMPOTENCY_KEY_CHARS + " ", None) == "k" * 256
    assert key_of("k" * (api.MAX_IDEMPOTENCY_KEY_CHARS + 1), None) == INVALID
