"""decide_send, the pure ``send_email`` decision: a table of requests and what
the contract says about each, in the contract's order (docs/contract.md).

No sender, no store, no event loop: the ids and the time are arguments. The
effects of each decision are proven in test_send_handler.py and end to end in
test_send_e2e.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from emailrelay import api
from emailrelay.handlers.send_decision import NewIds, Send, SendRules, Skip, decide_send
from tests.support.send_requests import DEFAULT_FROM, RULES, send_request

IDS = NewIds(email_id="email-1", group_id="group-1")
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def decide(body: Any, rules: SendRules = RULES) -> Send | Skip | api.ErrorReply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return decide_send(data, rules, IDS, NOW)


def error(message: str) -> api.ErrorReply:
    return api.ErrorReply(error=message)


ONLY_EXAMPLE_ORG = replace(RULES, allowed_recipient_domains=("example.org",))
DISABLED = replace(RULES, email_enabled=False)

# Each row breaks the rule of its own step and, where it can, a later one too:
# the earlier rule must win.
CONTRACT_ORDER = [
    ("not json", b"{", RULES, error(api.ERR_INVALID_PAYLOAD)),
    ("not an object", b"[]", RULES, error(api.ERR_INVALID_PAYLOAD)),
    ("wrong type", {**send_request(), "to": 1}, RULES, error(api.ERR_INVALID_PAYLOAD)),
    (
        "group id too long",
        {**send_request(), "group_id": "g" * (api.MAX_GROUP_ID_BYTES + 1), "to": ""},
        RULES,
        error(api.ERR_INVALID_PAYLOAD),
    ),
    (
        "missing text",
        {**send_request(), "text": "", "to": "bad"},
        RULES,
        error(api.ERR_SEND_FIELDS_REQUIRED),
    ),
    ("recipient outside allowlist", {**send_request(), "from": "bad"}, ONLY_EXAMPLE_ORG, "skip"),
    (
        "unparseable recipient under allowlist",
        {**send_request(), "to": "bad"},
        ONLY_EXAMPLE_ORG,
        "skip",
    ),
    (
        "invalid to",
        {**send_request(), "to": "bad", "from": "bad"},
        RULES,
        error(api.ERR_INVALID_TO),
    ),
    (
        "invalid from",
        {**send_request(), "from": "bad", "reply_to": "bad"},
        RULES,
        error(api.ERR_INVALID_FROM),
    ),
    (
        "from domain not allowed",
        {**send_request(), "from": "a@example.com", "reply_to": "bad"},
        RULES,
        error(api.ERR_FROM_DOMAIN_NOT_ALLOWED),
    ),
    (
        "invalid reply_to",
        {**send_request(), "reply_to": "bad"},
        DISABLED,
        error(api.ERR_INVALID_REPLY_TO),
    ),
    (
        "reply_to domain not allowed",
        {**send_request(), "reply_to": "a@example.com"},
        DISABLED,
        error(api.ERR_REPLY_TO_DOMAIN_NOT_ALLOWED),
    ),
    ("email disabled", send_request(), DISABLED, "skip"),
    ("valid", send_request(), RULES, "send"),
]


@pytest.mark.parametrize(
    ("body", "rules", "expected"),
    [row[1:] for row in CONTRACT_ORDER],
    ids=[row[0] for row in CONTRACT_ORDER],
)
def test_decision_follows_the_contract_order(
    body: Any, rules: SendRules, expected: api.ErrorReply | str
) -> None:
    decision = decide(body, rules)
    if expected == "skip":
        assert isinstance(decision, Skip)
    elif expected == "send":
        assert isinstance(decision, Send)
    else:
        assert decision == expected


def test_send_takes_the_given_ids_and_time() -> None:
    decision = decide(send_request())
    assert isinstance(decision, Send)
    assert (decision.email.email_id, decision.email.group_id) == ("email-1", "group-1")
    assert decision.record.sent_at == NOW
    assert (decision.record.email_id, decision.record.group_id) == ("email-1", "group-1")


def test_a_named_group_is_kept_over_the_new_group_id() -> None:
    decision = decide({**send_request(), "group_id": "mine"})
    assert isinstance(decision, Send)
    assert (decision.email.group_id, decision.record.group_id) == ("mine", "mine")


def test_the_default_sender_is_used_without_from() -> None:
    decision = decide(send_request())
    assert isinstance(decision, Send)
    assert decision.email.sender == DEFAULT_FROM
    assert decision.email.sender_display_name == "LFX Self Serve"


def test_the_record_keeps_to_without_line_breaks() -> None:
    decision = decide({**send_request(), "to": "jane@example.com\r\n"})
    assert isinstance(decision, Send)
    assert decision.record.to == "jane@example.com"


def test_a_skip_names_its_rule_and_redacts_the_recipient() -> None:
    decision = decide(send_request(), DISABLED)
    assert isinstance(decision, Skip)
    assert "EMAIL_ENABLED" in decision.reason
    assert "jane@example.com" not in decision.to
