"""Property tests: whatever bytes a caller sends, each handler answers exactly
one JSON reply, and never ``internal error`` for input the caller controls
(the stores here never fail, so any ``internal error`` would be our bug).
The same for the engagement-event parser and applier on arbitrary SQS bodies.

Fast (in-memory stores, a recording sender) and modest in size, so they run
in the default suite; ``--hypothesis-seed`` replays a failure.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from emailrelay import api
from emailrelay.api import TrackingRecord
from emailrelay.engagement.events import Skipped, apply_event, parse_message
from tests.support.handlers import handlers

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Text the way a hostile caller writes it: any code point, lone surrogates
# and line breaks included, sometimes long.
any_text = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec=None), max_size=50),
    st.sampled_from(["", " ", "a@b.example", "Name <a@b.example>", "a" * 5000, "\ud800"]),
    st.builds(lambda s, n: s * n, st.text(max_size=5), st.integers(0, 3000)),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), any_text)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)
    ),
    max_leaves=12,
)

SEND_FIELDS = ["to", "subject", "html", "text", "from", "from_display_name", "reply_to"]
SEND_FIELDS.append("group_id")


def request_of(fields: list[str]) -> st.SearchStrategy[bytes]:
    """Bytes a caller might send: garbage, any JSON, or an object of the known
    fields with values of any type (ASCII-escaped JSON keeps lone surrogates)."""
    known = st.fixed_dictionaries({}, optional={f: st.one_of(any_text, json_value) for f in fields})
    return st.one_of(
        st.binary(max_size=200),
        json_value.map(lambda v: json.dumps(v).encode()),
        known.map(lambda v: json.dumps(v).encode()),
        known.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
        st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    )


def assert_contract_reply(reply: bytes) -> Any:
    """The reply is JSON and either one of the contract's errors (never ``internal
    error``), alone, or a success (anything without an ``error`` field)."""
    decoded = json.loads(reply)
    if isinstance(decoded, dict) and "error" in decoded:
        assert decoded != {"error": api.ERR_INTERNAL}
        assert decoded["error"] in api.CONTRACT_ERRORS, decoded
        assert list(decoded) == ["error"], decoded
    return decoded


@SETTINGS
@given(request_of(SEND_FIELDS))
async def test_any_send_request_gets_a_contract_reply_not_internal_error(data: bytes) -> None:
    h = handlers()
    decoded = assert_contract_reply(await h.send(data))
    if decoded.get("email_id"):
        found = await h.status(json.dumps({"email_id": decoded["email_id"]}).encode())
        assert json.loads(found)["email_id"] == decoded["email_id"]


@SETTINGS
@given(request_of(["email_id", "group_id", "limit", "offset"]))
async def test_any_status_request_gets_a_contract_reply_not_internal_error(data: bytes) -> None:
    assert_contract_reply(await handlers().status(data))


@SETTINGS
@given(request_of(["group_id"]))
async def test_any_analytics_request_gets_a_contract_reply_not_internal_error(data: bytes) -> None:
    assert_contract_reply(await handlers().analytics(data))


# --- engagement events -------------------------------------------------------------

EVENT_TYPES = ["Delivery", "Open", "Click", "Bounce", "Complaint", "Reject", "DeliveryDelay"]
EVENT_TYPES.append("Send")
DETAILS = ["delivery", "open", "click", "bounce", "complaint", "reject", "deliveryDelay", "send"]


def ses_event() -> st.SearchStrategy[dict[str, Any]]:
    tracking_value = st.one_of(
        any_text,
        st.uuids().map(lambda u: f"group/{u}"),
        st.uuids().map(str),
        st.from_regex(r"\A[-/_=.a-zA-Z0-9 ]{0,40}/[-_=a-zA-Z0-9]{1,40}\Z"),
        st.integers(0, 2000).map(lambda n: "g/" + "e" * n),
    )
    header = st.fixed_dictionaries(
        {
            "name": st.sampled_from([api.TRACKING_HEADER, "x-lfx-tracking-id"]),
            "value": tracking_value,
        }
    )
    detail = st.dictionaries(
        st.sampled_from(["timestamp", "link", "bounceType", "reason", "delayType"]),
        st.one_of(any_text, json_value, st.integers(0, 200_000).map(lambda n: "L" * n)),
    )
    return st.fixed_dictionaries(
        {
            "eventType": st.sampled_from([*EVENT_TYPES, "Rendering Failure", "bogus"]),
            "mail": st.fixed_dictionaries(
                {"headers": st.lists(header, min_size=1, max_size=2)},
                optional={"messageId": any_text, "timestamp": any_text},
            ),
        },
        optional={name: detail for name in DETAILS},
    )


sns_wrapped = st.tuples(ses_event(), any_text).map(
    lambda pair: json.dumps(
        {"Type": "Notification", "MessageId": pair[1], "Message": json.dumps(pair[0])}
    )
)
sqs_body = st.one_of(
    st.text(),
    json_value.map(json.dumps),
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),
    ses_event().map(json.dumps),
    sns_wrapped,
    sns_wrapped,
    sns_wrapped,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)


@SETTINGS
@given(sqs_body, any_text, st.integers(0, 3))
def test_any_sqs_body_parses_and_applies_to_a_record_that_fits(
    body: str, sqs_message_id: str, repeats: int
) -> None:
    parsed = parse_message(body, sqs_message_id or "sqs-1")
    if isinstance(parsed, Skipped):
        return
    record = TrackingRecord(
        group_id="g", email_id=parsed.email_id, to="a@b.example", subject="s", sent_at=NOW
    )
    for _ in range(repeats + 1):
        apply_event(record, parsed, NOW)
    event(f"applied {parsed.kind}")
    encoded = record.to_json()
    assert len(encoded) <= api.RECORD_BUDGET
    TrackingRecord.model_validate_json(encoded)
