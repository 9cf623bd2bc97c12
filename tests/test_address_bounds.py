"""Addresses longer than RFC 5321 allows are unparseable, and parsing any
value costs time linear in it (the stdlib parser alone took 49 s on 256 KB).

Fast tests of :func:`parse_mailbox` and the send handler's check order, then
the same refusals end to end against a relay on the real servers.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from emailrelay import api
from emailrelay.addresses import (
    MAX_ADDRESS,
    MAX_LOCAL_PART,
    MAX_MAILBOX_VALUE,
    parse_mailbox,
)
from tests.support.handlers import handlers
from tests.support.nats_client import SyncNats
from tests.support.send_requests import (
    NATS_MAX_PAYLOAD,
    RULES,
    padded_to_max_payload,
    send_request,
)
from tests.support.servers.relay import RelayProcess
from tests.support.servers.smtp import SmtpServer

MIB = NATS_MAX_PAYLOAD


def local_part(n: int) -> str:
    return "l" * n


def address_of_length(n: int, domain: str = "example.org") -> str:
    """A valid-looking ``local@domain`` exactly ``n`` octets long."""
    labels = []
    rest = n - len("a@") - len(domain)
    while rest > 0:
        label = "d" * min(rest - 1, 63) if rest > 1 else ""
        labels.append(label)
        rest -= len(label) + 1
    full_domain = ".".join([*[x for x in labels if x], domain])
    address = "a@" + full_domain
    return "a" * (n - len(address) + 1) + address[1:] if len(address) < n else address


# --- RFC 5321 lengths --------------------------------------------------------------


def test_a_local_part_of_64_octets_parses() -> None:
    assert parse_mailbox(f"{local_part(MAX_LOCAL_PART)}@example.org") is not None


def test_a_local_part_of_65_octets_is_unparseable() -> None:
    assert parse_mailbox(f"{local_part(MAX_LOCAL_PART + 1)}@example.org") is None


def test_a_local_part_that_needs_quotes_counts_them() -> None:
    assert parse_mailbox(f'"a {local_part(MAX_LOCAL_PART - 4)}"@example.org') is not None
    assert parse_mailbox(f'"a {local_part(MAX_LOCAL_PART - 3)}"@example.org') is None


def test_an_address_of_254_octets_parses() -> None:
    address = address_of_length(MAX_ADDRESS)
    assert len(address) == MAX_ADDRESS
    mailbox = parse_mailbox(address)
    assert mailbox is not None
    assert mailbox.address == address


def test_an_address_of_255_octets_is_unparseable() -> None:
    address = address_of_length(MAX_ADDRESS + 1)
    assert len(address) == MAX_ADDRESS + 1
    assert parse_mailbox(address) is None


def test_an_over_long_address_with_a_display_name_is_unparseable() -> None:
    assert parse_mailbox(f"Jane <{address_of_length(MAX_ADDRESS + 1)}>") is None


def test_a_display_name_up_to_the_value_bound_parses() -> None:
    tail = " <jane@example.org>"
    name = "Jane " * ((MAX_MAILBOX_VALUE - len(tail)) // 5)
    mailbox = parse_mailbox(name.rstrip() + tail)
    assert mailbox is not None
    assert mailbox.address == "jane@example.org"


def test_a_value_longer_than_an_smtp_line_is_unparseable() -> None:
    tail = " <jane@example.org>"
    assert parse_mailbox("J" * (MAX_MAILBOX_VALUE + 1 - len(tail)) + tail) is None


# --- a megabyte of every shape: unparseable (and so at once) ----------------------

MIB_SHAPES: dict[str, str] = {
    "display name of words": "Jane " * (MIB // 5) + "<jane@example.org>",
    "quoted display name": '"' + "Jane " * (MIB // 5) + '" <jane@example.org>',
    "spaces inside the address": "jane" + " " * MIB + "@example.org",
    "long local part": "j" * MIB + "@example.org",
    "long domain": "jane@" + "d." * (MIB // 2) + "org",
    "a list": "jane@example.org, " * (MIB // 18),
    "nested comments": "(" * (MIB // 2) + ")" * (MIB // 2) + "jane@example.org",
    "angle brackets": "< " * (MIB // 2) + "jane@example.org>",
}


@pytest.mark.parametrize("shape", MIB_SHAPES)
def test_a_megabyte_value_of_any_shape_is_unparseable(shape: str) -> None:
    assert parse_mailbox(MIB_SHAPES[shape]) is None


# --- the send handler: the contract's order ------------------------------------


async def send(request: dict[str, str], rules: Any = RULES) -> tuple[Any, int]:
    h = handlers(rules)
    reply = json.loads(await h.send(json.dumps(request).encode()))
    return reply, len(h.sender.messages)


LONG_ADDRESS = address_of_length(MAX_ADDRESS + 1, domain="lfx.linuxfoundation.org")


@pytest.mark.parametrize(
    ("field_name", "error"),
    [
        ("to", api.ERR_INVALID_TO),
        ("from", api.ERR_INVALID_FROM),
        ("reply_to", api.ERR_INVALID_REPLY_TO),
    ],
)
async def test_an_address_over_rfc_5321_limits_is_invalid(field_name: str, error: str) -> None:
    reply, sent = await send({**send_request(), field_name: LONG_ADDRESS})
    assert reply == {"error": error}
    assert sent == 0


async def test_an_over_long_recipient_is_skipped_when_recipients_are_allowlisted() -> None:
    rules = replace(RULES, allowed_recipient_domains=("example.org",))
    reply, sent = await send({**send_request(), "to": address_of_length(MAX_ADDRESS + 1)}, rules)
    assert reply == {"email_id": "", "group_id": ""}
    assert sent == 0


# --- end to end ----------------------------------------------------------------------


FIELD_ERRORS = [
    ("to", api.ERR_INVALID_TO),
    ("from", api.ERR_INVALID_FROM),
    ("reply_to", api.ERR_INVALID_REPLY_TO),
]


@pytest.mark.parametrize(("field_name", "error"), FIELD_ERRORS)
def test_an_over_long_address_is_invalid_end_to_end(
    module_relay: RelayProcess,
    module_nats_client: SyncNats,
    smtp: SmtpServer,
    field_name: str,
    error: str,
) -> None:
    reply = module_nats_client.request_json(
        api.SEND_EMAIL_SUBJECT, {**send_request(), field_name: LONG_ADDRESS}
    )
    assert reply == {"error": error}
    assert smtp.messages == []


@pytest.mark.parametrize(("field_name", "error"), FIELD_ERRORS)
def test_the_largest_payload_nats_accepts_in_an_address_is_invalid_end_to_end(
    module_relay: RelayProcess,
    module_nats_client: SyncNats,
    smtp: SmtpServer,
    field_name: str,
    error: str,
) -> None:
    body = padded_to_max_payload(
        {**send_request(), field_name: "Jane <jane@example.org>"}, field_name
    )
    assert module_nats_client.request_json(api.SEND_EMAIL_SUBJECT, body) == {"error": error}
    assert smtp.messages == []
