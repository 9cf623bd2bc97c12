"""Caller mistakes get caller errors, never ``internal error``: lone
surrogates become U+FFFD, JSON nested past the parser's recursion limit is an
``invalid request payload``, and a subject carrying NUL or any character
``str.splitlines()`` breaks on is sent, on one header line.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from emailrelay import api
from emailrelay.handlers.replies import parse_request
from tests.support.handlers import handlers
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.relay import RelayProcess
from tests.support.servers.smtp import SmtpServer

LONE_SURROGATE = b'"Hi \\ud800 there"'
DEEP = b"[" * 100_000 + b"]" * 100_000
SUBJECTS = [api.SEND_EMAIL_SUBJECT, api.GET_EMAIL_STATUS_SUBJECT]
SUBJECTS.append(api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT)
LINE_BREAKS = ["\x00", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def send_body(**fields: bytes) -> bytes:
    """The valid request with some fields given as raw JSON values."""
    parts = [
        f'"{k}": {json.dumps(v)}'.encode() for k, v in send_request().items() if k not in fields
    ]
    parts += [f'"{k}": '.encode() + v for k, v in fields.items()]
    return b"{" + b", ".join(parts) + b"}"


# --- the shared decoder ------------------------------------------------------------


def test_a_lone_surrogate_becomes_the_replacement_character() -> None:
    request = parse_request(send_body(subject=LONE_SURROGATE), api.SendEmailRequest)
    assert request is not None
    assert request.subject == "Hi \ufffd there"


def test_an_escaped_surrogate_pair_stays_one_character() -> None:
    request = parse_request(send_body(subject=b'"\\ud83d\\ude00"'), api.SendEmailRequest)
    assert request is not None
    assert request.subject == "\U0001f600"


def test_json_nested_past_the_recursion_limit_is_not_a_request() -> None:
    assert parse_request(DEEP, api.SendEmailRequest) is None
    assert parse_request(send_body(subject=DEEP), api.SendEmailRequest) is None


# --- every handler ------------------------------------------------------------------


async def test_send_with_a_lone_surrogate_in_every_field_is_sent() -> None:
    h = handlers()
    body = send_body(
        subject=LONE_SURROGATE,
        html=LONE_SURROGATE,
        text=LONE_SURROGATE,
        from_display_name=LONE_SURROGATE,
        group_id=LONE_SURROGATE,
    )
    reply = json.loads(await h.send(body))
    assert reply["group_id"] == "Hi \ufffd there"
    assert len(h.sender.messages) == 1


@pytest.mark.parametrize("field_name", ["email_id", "group_id"])
async def test_status_with_a_lone_surrogate_id_is_not_found(field_name: str) -> None:
    h = handlers()
    reply = json.loads(await h.status(b'{"%s": "\\udfff"}' % field_name.encode()))
    assert reply == {"error": api.ERR_NOT_FOUND}


async def test_analytics_with_a_lone_surrogate_group_id_is_not_found() -> None:
    h = handlers()
    reply = json.loads(await h.analytics(b'{"group_id": "g\\ud800"}'))
    assert reply == {"error": api.ERR_NOT_FOUND}


@pytest.mark.parametrize("handler_name", ["send", "status", "analytics"])
async def test_deeply_nested_json_is_an_invalid_payload(handler_name: str) -> None:
    handler = getattr(handlers(), handler_name)
    assert json.loads(await handler(DEEP)) == {"error": api.ERR_INVALID_PAYLOAD}


# --- end to end -------------------------------------------------------------------


def request(client: SyncNats, subject: str, body: bytes) -> Any:
    return client.request_json(subject, body)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_deeply_nested_json_is_an_invalid_payload_end_to_end(
    module_relay: RelayProcess, module_nats_client: SyncNats, subject: str
) -> None:
    assert request(module_nats_client, subject, DEEP) == {"error": api.ERR_INVALID_PAYLOAD}


def test_a_lone_surrogate_subject_is_sent_with_the_replacement_character(
    module_relay: RelayProcess, module_nats_client: SyncNats, smtp: SmtpServer
) -> None:
    reply = request(module_nats_client, api.SEND_EMAIL_SUBJECT, send_body(subject=LONE_SURROGATE))
    assert "email_id" in reply, reply
    (message,) = smtp.wait_for_messages(1)
    assert message.parsed["Subject"] == "Hi \ufffd there"
    asked = json.dumps({"email_id": reply["email_id"]}).encode()
    record = request(module_nats_client, api.GET_EMAIL_STATUS_SUBJECT, asked)
    assert record["subject"] == "Hi \ufffd there"


@pytest.mark.parametrize("subject", SUBJECTS[1:])
def test_a_lone_surrogate_id_is_not_found_end_to_end(
    module_relay: RelayProcess, module_nats_client: SyncNats, subject: str
) -> None:
    assert request(module_nats_client, subject, b'{"group_id": "g\\ud800"}') == {
        "error": api.ERR_NOT_FOUND
    }


@pytest.mark.parametrize("line_break", LINE_BREAKS, ids=[f"U+{ord(c):04X}" for c in LINE_BREAKS])
def test_a_subject_with_a_line_break_character_arrives_on_one_header_line(
    module_relay: RelayProcess, module_nats_client: SyncNats, smtp: SmtpServer, line_break: str
) -> None:
    subject = f"Quarterly{line_break}report"
    reply = module_nats_client.request_json(
        api.SEND_EMAIL_SUBJECT, {**send_request(), "subject": subject}
    )
    assert "email_id" in reply, reply
    (message,) = smtp.wait_for_messages(1)
    lines = message.header_lines()
    (start,) = [i for i, line in enumerate(lines) if line.startswith(b"Subject:")]
    assert lines[start] == b"Subject: Quarterlyreport"
    assert not lines[start + 1].startswith((b" ", b"\t"))  # not folded onto a second line
