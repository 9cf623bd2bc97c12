"""``EMAIL_TRANSPORT=ses`` end to end: ``emailrelay serve`` subprocesses, a real
nats-server, moto's SES v2 server over HTTP (the sender's domain verified first,
as on a real account) and the suite's SMTP server, to show nothing goes there.

The same request through the SMTP transport is the reference: recipients must
not be able to tell the transports apart.
"""

from __future__ import annotations

import email
import email.policy
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from emailrelay import api
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, relay_defaults, run_relay_once
from tests.support.servers.ses import PAUSED, SILENCE, THROTTLED, ScriptedSes
from tests.support.servers.smtp import SmtpServer
from tests.support.transports import MotoSes, SesOutbox, tracking_ids

UNVERIFIED_DOMAIN = "unverified.example"

REQUEST: dict[str, str] = {
    "to": "Jane Doe <jane.doe@example.com>",
    "from_display_name": "Projects \u2013 LFX",
    "reply_to": "help@linuxfoundation.org",
    "subject": "Your meeting on Thursday, ünïcödé and a long line " + "x" * 120,
    "html": "<p>Hello Jane</p>\n<p>" + "long line " * 200 + "</p>",
    "text": "Hello Jane\n\nSee you Thursday.\n" + "é" * 300,
}


def relay_env(nats_server: NatsServer, smtp_server: SmtpServer) -> dict[str, str | None]:
    return {
        **relay_defaults(nats_server, smtp_server),
        "SES_CONFIGURATION_SET": "lfx-tracking",
        "SMTP_ALLOWED_FROM_DOMAINS": f"lfx.linuxfoundation.org,{UNVERIFIED_DOMAIN}",
    }


@pytest.fixture(scope="module")
def ses_relay(
    module_nats_server: NatsServer, smtp_server: SmtpServer, moto_ses: MotoSes
) -> Iterator[RelayProcess]:
    env = {**relay_env(module_nats_server, smtp_server), **moto_ses.relay_env()}
    with RelayProcess(env) as relay:
        relay.wait_ready()
        yield relay


@pytest.fixture(scope="module")
def caller(module_nats_server: NatsServer, ses_relay: RelayProcess) -> Iterator[SyncNats]:
    with SyncNats(module_nats_server.url) as client:
        yield client


@pytest.fixture
def ses(moto_ses: MotoSes) -> SesOutbox:
    return SesOutbox(moto_ses)


@pytest.fixture
def smtp(smtp_server: SmtpServer) -> SmtpServer:
    smtp_server.reset()
    return smtp_server


def send(caller: SyncNats, **changes: str) -> Any:
    """The module's request, with ``changes``; a sync request with a 10 s timeout."""
    return caller.request_json(api.SEND_EMAIL_SUBJECT, {**REQUEST, **changes}, timeout=10)


def parsed(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


# Differ from one send to the next whatever the transport (time, random ids).
VARYING_HEADERS = {"date", "message-id", api.TRACKING_HEADER.lower(), "content-type"}


def comparable(raw: bytes) -> tuple[list[tuple[str, str]], str, list[tuple[str, str]]]:
    """Headers (but those that vary per send), the multipart type, each part decoded."""
    message = parsed(raw)
    headers = [(k, str(v)) for k, v in message.items() if k.lower() not in VARYING_HEADERS]
    parts = [
        (part.get_content_type(), part.get_content())
        for part in message.iter_parts()  # type: ignore[attr-defined]
    ]
    return headers, message.get_content_type(), parts


def test_a_send_goes_through_ses_and_nothing_reaches_smtp(
    caller: SyncNats, ses: SesOutbox, smtp: SmtpServer
) -> None:
    reply = send(caller)

    (raw,) = ses.wait_for_messages(1)
    assert tracking_ids([raw]) == [reply["email_id"]]
    assert smtp.messages == []
    assert smtp.connections == 0


def test_ses_gets_the_sender_and_only_the_recipient(
    caller: SyncNats, moto_ses: MotoSes, ses: SesOutbox
) -> None:
    send(caller)

    ses.wait_for_messages(1)
    message = moto_ses.messages()[-1]
    assert message.source == "noreply@lfx.linuxfoundation.org"
    assert set(message.destinations) == {"jane.doe@example.com"}  # moto adds the To header's


def test_the_ses_message_equals_the_smtp_message_for_the_same_request(
    caller: SyncNats,
    ses: SesOutbox,
    smtp: SmtpServer,
    module_nats_server: NatsServer,
    smtp_server: SmtpServer,
) -> None:
    group = f"group-{uuid.uuid4()}"
    send(caller, group_id=group)
    (through_ses,) = ses.wait_for_messages(1)

    env = relay_env(module_nats_server, smtp_server)
    with (
        NatsServer() as other_nats,
        RelayProcess({**env, "NATS_URL": other_nats.url}) as smtp_relay,
    ):
        smtp_relay.wait_ready()
        with SyncNats(other_nats.url) as other_caller:
            send(other_caller, group_id=group)
    (through_smtp,) = smtp.wait_for_messages(1)

    assert comparable(through_ses) == comparable(through_smtp.raw)
    assert parsed(through_ses)[api.TRACKING_HEADER].startswith(group + "/")
    assert parsed(through_ses)["X-SES-CONFIGURATION-SET"] == "lfx-tracking"


def test_the_record_holds_the_message_id_ses_returned(
    caller: SyncNats, moto_ses: MotoSes, ses: SesOutbox
) -> None:
    reply = send(caller)
    ses.wait_for_messages(1)
    message_id = moto_ses.messages()[-1].message_id

    record = caller.request_json(api.GET_EMAIL_STATUS_SUBJECT, {"email_id": reply["email_id"]})

    assert record["ses_message_id"] == message_id


def test_an_unverified_sender_fails_at_once_and_the_next_send_is_as_prompt(
    caller: SyncNats, ses: SesOutbox, ses_relay: RelayProcess
) -> None:
    started = time.monotonic()
    refused = send(caller, **{"from": f"news@{UNVERIFIED_DOMAIN}"})
    refused_after = time.monotonic() - started

    started = time.monotonic()
    accepted = send(caller)
    accepted_after = time.monotonic() - started

    assert refused == {"error": api.ERR_DELIVERY_FAILED}
    assert refused_after < 1.0
    assert "email_id" in accepted
    assert accepted_after < 1.0
    assert len(ses.messages()) == 1
    assert "MessageRejected" in ses_relay.logs()


@pytest.mark.parametrize(
    ("unset", "named"),
    [
        (("AWS_REGION",), "AWS_REGION"),
        (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), "no AWS credentials found"),
    ],
    ids=["no region", "no credentials"],
)
def test_ses_unusable_at_start_exits_1_with_one_line(
    module_nats_server: NatsServer,
    smtp_server: SmtpServer,
    moto_ses: MotoSes,
    unset: tuple[str, ...],
    named: str,
) -> None:
    env = {
        **relay_env(module_nats_server, smtp_server),
        **moto_ses.relay_env(),
        **dict.fromkeys(unset),
        "LOG_LEVEL": "error",
    }

    code, stdout, stderr = run_relay_once(env, timeout=30)

    assert code == 1, stderr
    lines = (stdout + stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "EMAIL_TRANSPORT is ses" in lines[0]
    assert named in lines[0]


# --- against the scripted endpoint: SES's error format, requests counted --------


@pytest.fixture(scope="module")
def scripted_ses() -> Iterator[ScriptedSes]:
    with ScriptedSes() as server:
        yield server


@pytest.fixture(scope="module")
def scripted_relay(
    module_nats_server: NatsServer,
    smtp_server: SmtpServer,
    moto_ses: MotoSes,
    scripted_ses: ScriptedSes,
) -> Iterator[tuple[RelayProcess, SyncNats]]:
    """A relay of its own (on a nats-server of its own) sending to ``scripted_ses``."""
    env = {
        **relay_env(module_nats_server, smtp_server),
        **moto_ses.relay_env(),
        "AWS_ENDPOINT_URL_SESV2": scripted_ses.endpoint_url,
        "SEND_TIMEOUT": "2s",
    }
    with NatsServer() as nats_server, RelayProcess({**env, "NATS_URL": nats_server.url}) as relay:
        relay.wait_ready()
        with SyncNats(nats_server.url) as client:
            yield relay, client


@pytest.fixture
def scripted(
    scripted_ses: ScriptedSes, scripted_relay: tuple[RelayProcess, SyncNats]
) -> Iterator[tuple[ScriptedSes, RelayProcess, SyncNats]]:
    scripted_ses.requests.clear()
    yield scripted_ses, *scripted_relay
    scripted_ses.otherwise = None


def test_no_answer_after_the_request_holds_the_key_as_outcome_unknown(
    scripted: tuple[ScriptedSes, RelayProcess, SyncNats],
) -> None:
    ses, _, caller = scripted
    ses.reply_next(SILENCE)
    key = f"order-{uuid.uuid4()}"

    first = send(caller, idempotency_key=key)
    again = send(caller, idempotency_key=key)

    assert first == {"error": api.ERR_DELIVERY_OUTCOME_UNKNOWN}
    assert again == {"error": api.ERR_DELIVERY_OUTCOME_UNKNOWN}
    assert ses.request_count == 1


def test_a_paused_account_fails_every_send_at_once_and_is_counted(
    scripted: tuple[ScriptedSes, RelayProcess, SyncNats],
) -> None:
    ses, relay, caller = scripted
    ses.otherwise = PAUSED
    before = relay.metric("emailrelay_ses_sending_paused_total", error="SendingPausedException")

    replies = [send(caller) for _ in range(3)]

    assert replies == [{"error": api.ERR_DELIVERY_FAILED}] * 3
    assert ses.request_count == 3
    after = relay.metric("emailrelay_ses_sending_paused_total", error="SendingPausedException")
    assert after == before + 3


def test_throttling_is_retried_until_ses_accepts(
    scripted: tuple[ScriptedSes, RelayProcess, SyncNats],
) -> None:
    ses, relay, caller = scripted
    ses.reply_next(THROTTLED, times=2)

    reply = send(caller)

    assert "email_id" in reply
    assert ses.request_count == 3
    assert relay.metric("emailrelay_smtp_throttled_total", transport="ses") >= 2
