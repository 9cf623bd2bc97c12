"""``send_email`` end to end: ``emailrelay serve`` subprocesses, real nats-server and SMTP servers.

Each relay configuration runs on a nats-server of its own (the queue group would
otherwise share requests between relays configured differently) and lives for
the whole module; tests send with plain nats-py requests and look at the wire:
the NATS reply, the bytes the SMTP server received, the KV buckets, the log.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from emailrelay import api
from tests.conftest import TLS_SMTP_PASSWORD, TLS_SMTP_USERNAME
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, relay_defaults
from tests.support.servers.smtp import ReceivedMessage, SmtpServer

RECIPIENT = "jane.doe@example.com"
# Subject, HTML and text the MIME assertions below read back from the message.
VALID = send_request(
    to=RECIPIENT, subject="Your weekly digest", html="<p>Hello <b>Jane</b></p>", text="Hello Jane"
)
SKIPPED = {"email_id": "", "group_id": ""}
SENT_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@dataclass
class Stack:
    """A nats-server, a client on it, and relay processes configured alike."""

    nats: NatsServer
    client: SyncNats
    relays: list[RelayProcess] = field(default_factory=list)

    def send(self, request: Any = None, **changes: Any) -> Any:
        body = dict(VALID) if request is None else request
        if isinstance(body, dict):
            body = {**body, **{("from" if k == "from_" else k): v for k, v in changes.items()}}
        return self.client.request_json(api.SEND_EMAIL_SUBJECT, body)

    def send_many(self, bodies: list[Any], concurrency: int = 64) -> list[Any]:
        return self.client.request_many(api.SEND_EMAIL_SUBJECT, bodies, concurrency=concurrency)

    def record(self, email_id: str) -> dict[str, Any] | None:
        value = self.client.kv_get(api.RECIPIENTS_BUCKET, email_id)
        return None if value is None else json.loads(value)

    def group(self, group_id: str) -> list[str] | None:
        value = self.client.kv_get(api.GROUP_INDEX_BUCKET, group_id)
        return None if value is None else json.loads(value)

    def stored_records(self) -> int:
        async def count() -> int:
            kv = await self.client.js.key_value(api.RECIPIENTS_BUCKET)
            return int((await kv.status()).values)

        return self.client.run(count())

    def logs(self) -> str:
        return "\n".join(relay.logs() for relay in self.relays)

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for relay in self.relays:
            for line in relay.stderr().splitlines():
                if line.startswith("{"):
                    entries.append(json.loads(line))
        return entries

    def close(self) -> None:
        for relay in self.relays:
            relay.close()
        self.client.close()
        self.nats.close()


StackFactory = Callable[..., Stack]


@pytest.fixture(scope="module")
def stacks(smtp_server: SmtpServer) -> Iterator[StackFactory]:
    """``stacks(env, relays=1) -> Stack``: one per distinct configuration, kept for the module.

    The default environment sends to ``smtp_server`` in clear; ``env`` overrides it
    (a None value removes a variable).
    """
    started: dict[tuple[tuple[str, str | None], ...], Stack] = {}

    def get(env: Mapping[str, str | None] | None = None, relays: int = 1) -> Stack:
        key = (*sorted((env or {}).items()), ("relays", str(relays)))
        if key in started:
            return started[key]
        nats = NatsServer()
        nats.start()
        stack = Stack(nats, SyncNats(nats.url))
        started[key] = stack
        overrides = {**relay_defaults(nats, smtp_server), **(env or {})}
        for _ in range(relays):
            relay = RelayProcess(overrides)
            stack.relays.append(relay)
            relay.start()
        for relay in stack.relays:
            relay.wait_ready()
        return stack

    yield get
    for stack in started.values():
        stack.close()


@pytest.fixture
def relay(stacks: StackFactory) -> Stack:
    """A relay with the contract's defaults (tracking on), sending to ``smtp``."""
    return stacks()


def only_message(smtp: SmtpServer) -> ReceivedMessage:
    messages = smtp.wait_for_messages(1)
    assert len(messages) == 1
    return messages[0]


def header_lines(message: ReceivedMessage) -> list[bytes]:
    return message.header_lines()


def body_parts(message: ReceivedMessage) -> tuple[str, str]:
    """(text/plain, text/html), CRLF normalised to LF."""
    parsed = message.parsed
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    contents = [p.get_content().replace("\r\n", "\n") for p in parts]
    return contents[0], contents[1]


def tracking_lines(message: ReceivedMessage) -> list[bytes]:
    return [line for line in message.header_lines() if line.startswith(b"X-LFX-TRACKING-ID:")]


def unique_group() -> str:
    return f"group-{uuid.uuid4().hex}"


# the error strings, in the contract's order


@pytest.mark.parametrize(
    "body", [b"{not json", b"[]", b'"text"', b"12"], ids=["not-json", "array", "string", "number"]
)
def test_body_that_is_not_an_object_is_invalid_payload(relay: Stack, body: bytes) -> None:
    assert relay.send(body) == {"error": api.ERR_INVALID_PAYLOAD}


def test_null_body_is_invalid_payload_or_missing_fields(relay: Stack) -> None:
    assert relay.send(b"null") in (
        {"error": api.ERR_INVALID_PAYLOAD},
        {"error": api.ERR_SEND_FIELDS_REQUIRED},
    )


def test_field_of_wrong_type_is_invalid_payload(relay: Stack) -> None:
    assert relay.send(to=["a@example.com"]) == {"error": api.ERR_INVALID_PAYLOAD}


def test_missing_field_is_required_error(relay: Stack) -> None:
    body = {k: v for k, v in VALID.items() if k != "html"}
    assert relay.send(body) == {"error": api.ERR_SEND_FIELDS_REQUIRED}


def test_empty_field_is_required_error(relay: Stack) -> None:
    assert relay.send(text="") == {"error": api.ERR_SEND_FIELDS_REQUIRED}


def test_unparseable_to_is_invalid_to(relay: Stack, smtp: SmtpServer) -> None:
    assert relay.send(to="jane, joe@example.com") == {"error": api.ERR_INVALID_TO}
    assert smtp.messages == []


def test_unparseable_from_is_invalid_from(relay: Stack) -> None:
    assert relay.send(from_="nobody") == {"error": api.ERR_INVALID_FROM}


def test_from_outside_allowlist_is_not_allowed(relay: Stack) -> None:
    reply = relay.send(from_="x@linuxfoundation.org")
    assert reply == {"error": api.ERR_FROM_DOMAIN_NOT_ALLOWED}


def test_unparseable_reply_to_is_invalid_reply_to(relay: Stack) -> None:
    assert relay.send(reply_to="help@") == {"error": api.ERR_INVALID_REPLY_TO}


def test_reply_to_without_label_boundary_is_not_allowed(relay: Stack) -> None:
    reply = relay.send(reply_to="help@evillinuxfoundation.org")
    assert reply == {"error": api.ERR_REPLY_TO_DOMAIN_NOT_ALLOWED}


def test_reply_to_subdomain_is_allowed(relay: Stack, smtp: SmtpServer) -> None:
    assert "email_id" in relay.send(reply_to="help@lists.linuxfoundation.org")
    assert only_message(smtp).parsed["Reply-To"] == "help@lists.linuxfoundation.org"


def test_unknown_fields_are_ignored(relay: Stack, smtp: SmtpServer) -> None:
    assert "email_id" in relay.send(cc="x@example.com", attachments=[1, 2])
    assert only_message(smtp).rcpt_tos == [RECIPIENT]


def test_5xx_is_delivery_failed_and_not_recorded(relay: Stack, smtp: SmtpServer) -> None:
    smtp.fail_all_data(554)
    group_id = unique_group()
    assert relay.send(group_id=group_id) == {"error": api.ERR_DELIVERY_FAILED}
    assert relay.group(group_id) is None
    (failed,) = [
        e
        for e in relay.log_entries()
        if e["msg"] == "email delivery failed" and e.get("group_id") == group_id
    ]
    assert relay.record(failed["email_id"]) is None


# allowlists and defaults that need their own configuration


def test_recipient_outside_allowlist_is_skipped(stacks: StackFactory, smtp: SmtpServer) -> None:
    stack = stacks({"SMTP_ALLOWED_RECIPIENT_DOMAINS": "example.com"})
    group_id = unique_group()
    assert stack.send(to="jane@example.org", group_id=group_id) == SKIPPED
    assert stack.send(to="jane@notexample.com", group_id=group_id) == SKIPPED
    assert smtp.messages == []
    assert stack.group(group_id) is None
    assert stack.stored_records() == 0


def test_recipient_in_allowlisted_subdomain_is_sent(stacks: StackFactory, smtp: SmtpServer) -> None:
    stack = stacks({"SMTP_ALLOWED_RECIPIENT_DOMAINS": "example.com"})
    assert stack.send(to="jane@eu.example.com")["email_id"]
    assert only_message(smtp).rcpt_tos == ["jane@eu.example.com"]


def test_disabled_sending_answers_empty_ids(stacks: StackFactory, smtp: SmtpServer) -> None:
    stack = stacks({"EMAIL_ENABLED": "false"})
    assert stack.send() == SKIPPED
    assert smtp.messages == []
    assert stack.stored_records() == 0


def test_disabled_sending_still_checks_the_request(stacks: StackFactory) -> None:
    stack = stacks({"EMAIL_ENABLED": "false"})
    assert stack.send(reply_to="x@evil.example") == {"error": api.ERR_REPLY_TO_DOMAIN_NOT_ALLOWED}


def test_empty_from_allowlist_allows_no_from(stacks: StackFactory) -> None:
    stack = stacks({"SMTP_ALLOWED_FROM_DOMAINS": ""})
    reply = stack.send(from_="events@lfx.linuxfoundation.org")
    assert reply == {"error": api.ERR_FROM_DOMAIN_NOT_ALLOWED}


def test_empty_reply_to_allowlist_allows_no_reply_to(stacks: StackFactory) -> None:
    stack = stacks({"SMTP_ALLOWED_REPLY_TO_DOMAINS": ""})
    reply = stack.send(reply_to="help@linuxfoundation.org")
    assert reply == {"error": api.ERR_REPLY_TO_DOMAIN_NOT_ALLOWED}


def test_default_sender_and_display_name(relay: Stack, smtp: SmtpServer) -> None:
    relay.send()
    message = only_message(smtp)
    assert message.mail_from == "noreply@lfx.linuxfoundation.org"
    assert message.parsed["From"] == "LFX Self Serve <noreply@lfx.linuxfoundation.org>"


def test_configured_default_sender_and_display_name(stacks: StackFactory, smtp: SmtpServer) -> None:
    stack = stacks(
        {"DEFAULT_SMTP_FROM": "relay@lfx.example", "DEFAULT_SMTP_FROM_DISPLAY_NAME": "Relay Team"}
    )
    stack.send()
    message = only_message(smtp)
    assert message.mail_from == "relay@lfx.example"
    assert message.parsed["From"] == "Relay Team <relay@lfx.example>"


def test_legacy_smtp_from_is_the_default_sender(stacks: StackFactory, smtp: SmtpServer) -> None:
    stack = stacks({"SMTP_FROM": "legacy@lfx.example"})
    stack.send()
    assert only_message(smtp).mail_from == "legacy@lfx.example"


def test_given_from_and_display_name(relay: Stack, smtp: SmtpServer) -> None:
    relay.send(from_="events@lfx.linuxfoundation.org", from_display_name="LFX Events")
    message = only_message(smtp)
    assert message.mail_from == "events@lfx.linuxfoundation.org"
    assert message.parsed["From"] == "LFX Events <events@lfx.linuxfoundation.org>"


def test_empty_optional_fields_mean_absent(relay: Stack, smtp: SmtpServer) -> None:
    reply = relay.send(from_="", from_display_name="", reply_to="", group_id="")
    message = only_message(smtp)
    assert message.mail_from == "noreply@lfx.linuxfoundation.org"
    assert message.parsed["From"] == "LFX Self Serve <noreply@lfx.linuxfoundation.org>"
    assert message.parsed["Reply-To"] is None
    assert uuid.UUID(reply["group_id"])


def test_generated_group_id_is_a_uuid(relay: Stack) -> None:
    reply = relay.send()
    assert uuid.UUID(reply["group_id"]).version == 4
    assert uuid.UUID(reply["email_id"]).version == 4


def test_given_group_id_is_echoed(relay: Stack) -> None:
    assert relay.send(group_id="newsletter-42")["group_id"] == "newsletter-42"


# the message at the SMTP server


def test_envelope_is_the_sender_and_the_recipient_only(relay: Stack, smtp: SmtpServer) -> None:
    relay.send(
        to=f"Jane Doe <{RECIPIENT}>",
        from_="events@lfx.linuxfoundation.org",
        reply_to="help@linuxfoundation.org",
    )
    message = only_message(smtp)
    assert message.mail_from == "events@lfx.linuxfoundation.org"
    assert message.rcpt_tos == [RECIPIENT]


def test_headers_decode_to_the_request(relay: Stack, smtp: SmtpServer) -> None:
    relay.send()
    parsed = only_message(smtp).parsed
    assert parsed["To"] == RECIPIENT
    assert parsed["Subject"] == VALID["subject"]


def test_message_id_date_and_mime_version(relay: Stack, smtp: SmtpServer) -> None:
    relay.send()
    parsed = only_message(smtp).parsed
    assert re.fullmatch(r"<[^<>@\s]+@lfx\.linuxfoundation\.org>", parsed["Message-ID"])
    assert parsed["Date"].datetime.tzinfo is not None
    assert parsed["MIME-Version"] == "1.0"


def test_reply_to_only_when_given(relay: Stack, smtp: SmtpServer) -> None:
    relay.send()
    assert only_message(smtp).parsed["Reply-To"] is None


def test_reply_to_when_given(relay: Stack, smtp: SmtpServer) -> None:
    relay.send(reply_to="Help Desk <help@linuxfoundation.org>")
    assert only_message(smtp).parsed["Reply-To"].addresses[0].addr_spec == (
        "help@linuxfoundation.org"
    )


def test_no_configuration_set_header_by_default(relay: Stack, smtp: SmtpServer) -> None:
    relay.send()
    assert b"X-SES-CONFIGURATION-SET" not in only_message(smtp).raw


def test_configuration_set_header_when_configured(stacks: StackFactory, smtp: SmtpServer) -> None:
    stack = stacks({"SES_CONFIGURATION_SET": "lfx-engagement"})
    stack.send()
    assert b"X-SES-CONFIGURATION-SET: lfx-engagement" in header_lines(only_message(smtp))


def test_both_parts_equal_the_request(relay: Stack, smtp: SmtpServer) -> None:
    relay.send()
    text, html = body_parts(only_message(smtp))
    assert (text.rstrip("\n"), html.rstrip("\n")) == (VALID["text"], VALID["html"])


def test_5000_character_html_line_arrives_intact(relay: Stack, smtp: SmtpServer) -> None:
    html = '<table><tr><td style="x">' + "y" * 5000 + "</td></tr></table>"
    relay.send(html=html)
    message = only_message(smtp)
    assert max(len(line) for line in message.raw.split(b"\r\n")) <= 998
    assert body_parts(message)[1].rstrip("\n") == html


def test_lone_dot_line_arrives_intact(relay: Stack, smtp: SmtpServer) -> None:
    text = "first\n.\nlast"
    html = "<p>first</p>\n.\n<p>last</p>"
    relay.send(text=text, html=html)
    parts = body_parts(only_message(smtp))
    assert (parts[0].rstrip("\n"), parts[1].rstrip("\n")) == (text, html)


def test_non_ascii_subject_is_encoded_and_decodes(relay: Stack, smtp: SmtpServer) -> None:
    subject = "Résumé du mois — 日本語 ✓"
    relay.send(subject=subject)
    message = only_message(smtp)
    subject_lines = [line for line in header_lines(message) if line.lower().startswith(b"subject:")]
    assert subject_lines
    assert all(line.isascii() for line in header_lines(message))
    assert b"=?utf-8?" in b"".join(header_lines(message)).lower()
    assert message.parsed["Subject"] == subject


def test_non_ascii_display_name_is_encoded_and_decodes(relay: Stack, smtp: SmtpServer) -> None:
    relay.send(from_display_name="Zoë Ångström")
    message = only_message(smtp)
    (from_line,) = [line for line in header_lines(message) if line.startswith(b"From:")]
    assert from_line.isascii()
    assert b"=?utf-8?" in from_line.lower()
    sender = message.parsed["From"].addresses[0]
    assert (sender.display_name, sender.addr_spec) == (
        "Zoë Ångström",
        "noreply@lfx.linuxfoundation.org",
    )


def test_tracking_header_is_one_raw_line_for_a_60_character_group_id(
    relay: Stack, smtp: SmtpServer
) -> None:
    group_id = "campaign-" + "x" * 51
    assert len(group_id) == 60
    reply = relay.send(group_id=group_id)
    expected = f"X-LFX-TRACKING-ID: {group_id}/{reply['email_id']}".encode()
    assert tracking_lines(only_message(smtp)) == [expected]


def test_tracking_header_percent_encodes_non_ascii_and_percent(
    relay: Stack, smtp: SmtpServer
) -> None:
    reply = relay.send(group_id="réunion 100%")
    expected = f"X-LFX-TRACKING-ID: r%C3%A9union 100%25/{reply['email_id']}".encode()
    assert tracking_lines(only_message(smtp)) == [expected]


def test_group_id_that_looks_like_an_encoded_word_is_written_raw(
    relay: Stack, smtp: SmtpServer
) -> None:
    reply = relay.send(group_id="=?utf-8?q?abc?=")
    expected = f"X-LFX-TRACKING-ID: =?utf-8?q?abc?=/{reply['email_id']}".encode()
    assert tracking_lines(only_message(smtp)) == [expected]


def test_over_long_group_id_keeps_the_line_short_and_the_email_id(
    relay: Stack, smtp: SmtpServer
) -> None:
    reply = relay.send(group_id="g" * api.MAX_GROUP_ID_BYTES)
    (line,) = tracking_lines(only_message(smtp))
    assert len(line) <= 998
    assert line.endswith(f"/{reply['email_id']}".encode())
    assert reply["group_id"] == "g" * api.MAX_GROUP_ID_BYTES


# header injection: no extra header, no extra recipient

INJECTED = "\r\nBcc: evil@attacker.example\r\nX-Injected: yes"


def assert_nothing_injected(message: ReceivedMessage) -> None:
    names = [line.split(b":", 1)[0].lower() for line in header_lines(message) if b":" in line]
    assert b"bcc" not in names
    assert b"x-injected" not in names
    assert message.rcpt_tos == [RECIPIENT]


def test_crlf_in_subject_injects_nothing(relay: Stack, smtp: SmtpServer) -> None:
    relay.send(subject="Hello" + INJECTED)
    assert_nothing_injected(only_message(smtp))


def test_crlf_in_display_name_injects_nothing(relay: Stack, smtp: SmtpServer) -> None:
    relay.send(from_display_name="Team" + INJECTED)
    assert_nothing_injected(only_message(smtp))


def test_crlf_in_group_id_injects_nothing(relay: Stack, smtp: SmtpServer) -> None:
    reply = relay.send(group_id="batch" + INJECTED)
    message = only_message(smtp)
    assert_nothing_injected(message)
    (line,) = tracking_lines(message)
    assert line.endswith(f"/{reply['email_id']}".encode())


def test_crlf_in_to_sends_nothing(relay: Stack, smtp: SmtpServer) -> None:
    assert relay.send(to=RECIPIENT + INJECTED) == {"error": api.ERR_INVALID_TO}
    assert smtp.messages == []


def test_crlf_in_reply_to_sends_nothing(relay: Stack, smtp: SmtpServer) -> None:
    reply = relay.send(reply_to="help@linuxfoundation.org" + INJECTED)
    assert reply == {"error": api.ERR_INVALID_REPLY_TO}
    assert smtp.messages == []


def test_long_display_name_with_an_address_in_it_adds_no_sender(
    relay: Stack, smtp: SmtpServer
) -> None:
    name = "Support Team of the Linux Foundation Events and Training <ceo@evil.example>, x"
    relay.send(from_display_name=name)
    message = only_message(smtp)
    senders = [a.addr_spec for a in message.parsed["From"].addresses]
    assert senders == ["noreply@lfx.linuxfoundation.org"]
    assert b"ceo@evil.example" not in message.raw


def test_non_ascii_recipient_domain_is_invalid_to(relay: Stack, smtp: SmtpServer) -> None:
    assert relay.send(to="user@bücher.example") == {"error": api.ERR_INVALID_TO}
    assert smtp.messages == []


def test_trailing_crlf_in_to_is_stripped(relay: Stack, smtp: SmtpServer) -> None:
    assert "email_id" in relay.send(to=RECIPIENT + "\r\n")
    assert only_message(smtp).rcpt_tos == [RECIPIENT]


# delivery outcomes


def test_4xx_then_success_delivers_once(relay: Stack, smtp: SmtpServer) -> None:
    smtp.fail_next_data(451)
    reply = relay.send()
    assert "email_id" in reply
    assert len(only_message(smtp).raw) > 0
    assert len(smtp.rejected) == 1


def test_drop_after_data_fails_and_is_never_retried(relay: Stack, smtp: SmtpServer) -> None:
    smtp.drop_connection_after_data = True
    assert relay.send() == {"error": api.ERR_DELIVERY_FAILED}
    assert len(smtp.messages) == 1


def test_many_sends_use_few_connections(stacks: StackFactory, smtp: SmtpServer) -> None:
    stack = stacks({"SMTP_POOL_SIZE": "4"})
    replies = stack.send_many([dict(VALID) for _ in range(60)], concurrency=30)
    assert all("email_id" in r for r in replies)
    assert len(smtp.wait_for_messages(60)) == 60
    assert smtp.connections <= 4


# tracking


def test_tracking_record_after_a_send(relay: Stack) -> None:
    reply = relay.send(group_id="records-1")
    record = relay.record(reply["email_id"])
    assert record is not None
    assert set(record) == {
        "group_id",
        "email_id",
        "to",
        "subject",
        "sent_at",
        "delivered",
        "opened",
        "open_count",
        "failed",
    }
    assert (record["group_id"], record["email_id"]) == ("records-1", reply["email_id"])
    assert (record["to"], record["subject"]) == (RECIPIENT, VALID["subject"])
    assert SENT_AT.match(record["sent_at"])
    assert (record["delivered"], record["opened"], record["failed"]) == (False, False, False)
    assert record["open_count"] == 0


def test_group_index_lists_the_sends_in_order(relay: Stack) -> None:
    group_id = unique_group()
    first = relay.send(group_id=group_id)["email_id"]
    second = relay.send(group_id=group_id)["email_id"]
    assert relay.group(group_id) == [first, second]


def test_200_concurrent_sends_from_two_relays_all_land_in_the_index(
    stacks: StackFactory, smtp: SmtpServer
) -> None:
    stack = stacks(relays=2)
    group_id = unique_group()
    replies = stack.send_many([{**VALID, "group_id": group_id} for _ in range(200)])
    ids = [r["email_id"] for r in replies]
    assert len(set(ids)) == 200
    index = stack.group(group_id)
    assert index is not None
    assert sorted(index) == sorted(ids)
    handled = [relay.stderr().count('"msg": "email sent"') for relay in stack.relays]
    assert all(count > 0 for count in handled), handled


# TLS and credentials


def tls_env(server: SmtpServer, ca_pem_file: Path | None, mode: str) -> dict[str, str | None]:
    return {
        "SMTP_HOST": server.host,
        "SMTP_PORT": str(server.port),
        "SMTP_TLS_MODE": mode,
        "SMTP_USERNAME": TLS_SMTP_USERNAME,
        "SMTP_PASSWORD": TLS_SMTP_PASSWORD,
        "SSL_CERT_FILE": str(ca_pem_file) if ca_pem_file else None,
        "SEND_TIMEOUT": "5s",
    }


@pytest.mark.parametrize("mode", ["auto", "starttls"])
def test_starttls_and_auth(
    stacks: StackFactory, tls_smtp: SmtpServer, ca_pem_file: Path, mode: str
) -> None:
    stack = stacks(tls_env(tls_smtp, ca_pem_file, mode))
    assert "email_id" in stack.send()
    message = only_message(tls_smtp)
    assert message.over_tls
    assert message.auth_login == TLS_SMTP_USERNAME
    assert TLS_SMTP_PASSWORD not in stack.logs()


def test_untrusted_certificate_fails_the_send(stacks: StackFactory, tls_smtp: SmtpServer) -> None:
    stack = stacks(tls_env(tls_smtp, None, "auto"))
    assert stack.send() == {"error": api.ERR_DELIVERY_FAILED}
    assert tls_smtp.messages == []
    assert tls_smtp.auth_attempts == []


def test_credentials_are_never_sent_without_tls(
    stacks: StackFactory, clear_auth_smtp: SmtpServer
) -> None:
    stack = stacks(tls_env(clear_auth_smtp, None, "auto"))
    assert stack.send() == {"error": api.ERR_DELIVERY_FAILED}
    assert clear_auth_smtp.auth_attempts == []
    assert clear_auth_smtp.messages == []
    assert "refusing to send SMTP credentials without TLS" in stack.logs()


def test_tls_mode_none_sends_credentials_in_clear(
    stacks: StackFactory, clear_auth_smtp: SmtpServer
) -> None:
    stack = stacks(tls_env(clear_auth_smtp, None, "none"))
    assert "email_id" in stack.send()
    assert [(a.over_tls, a.succeeded) for a in clear_auth_smtp.auth_attempts] == [(False, True)]
    assert only_message(clear_auth_smtp).auth_login == TLS_SMTP_USERNAME


# logs


def test_logs_never_hold_the_recipient_address(stacks: StackFactory, smtp: SmtpServer) -> None:
    stack = stacks({"SMTP_ALLOWED_RECIPIENT_DOMAINS": "example.com,example.net"})
    sent, skipped, refused = "ann.sent@example.com", "bob.skipped@example.org", "cy@example.net"
    assert "email_id" in stack.send(to=sent)
    assert stack.send(to=skipped) == SKIPPED
    smtp.fail_next("RCPT", 550, text=f"mailbox unavailable: <{refused}>")
    assert stack.send(to=refused) == {"error": api.ERR_DELIVERY_FAILED}
    logs = stack.logs()
    assert "an***@example.com" in logs
    for address in (sent, skipped, refused):
        assert address not in logs
