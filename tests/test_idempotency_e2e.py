"""Idempotent sends end to end: two ``emailrelay serve`` replicas in one queue
group on a real nats-server (JetStream KV ``email-idempotency``), a real SMTP
server of this module's own, plain nats-py requests.

Every rule of issue 11, part 1, is read off the wire: the replies, the
messages the SMTP server received, the bucket's entries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import nats.errors
import pytest

from emailrelay import api
from emailrelay.bridge.smtp import DATA_REPLY_WAIT
from emailrelay.client import EmailRelayClient
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import EnvOverrides, RelayProcess, relay_defaults
from tests.support.servers.smtp import SmtpServer, tracked_email_ids
from tests.support.transports import Outbox, on_both_transports, tracking_ids

REQUEST: dict[str, Any] = {
    "to": "jane.doe@example.com",
    "subject": "Your invoice",
    "html": "<p>Invoice</p>",
    "text": "Invoice",
}


@pytest.fixture(scope="module")
def replicas(
    module_nats_server: NatsServer, smtp_server: SmtpServer, transport_relay_env: EnvOverrides
) -> Iterator[list[RelayProcess]]:
    """Two relays in the queue group, sharing the bucket, on the module's ``transport``."""
    env: EnvOverrides = {**relay_defaults(module_nats_server, smtp_server), **transport_relay_env}
    relays = [RelayProcess(env), RelayProcess(env)]
    for relay in relays:
        relay.start()
    for relay in relays:
        relay.wait_ready()
    yield relays
    for relay in relays:
        relay.close()


@pytest.fixture(scope="module")
def caller(module_nats_server: NatsServer) -> Iterator[SyncNats]:
    with SyncNats(module_nats_server.url) as client:
        yield client


@pytest.fixture
def smtp(smtp_server: SmtpServer, replicas: list[RelayProcess]) -> SmtpServer:
    smtp_server.reset()
    return smtp_server


@pytest.fixture
def sent(outbox: Outbox, replicas: list[RelayProcess]) -> Outbox:
    """What the module's transport delivered in this test (SMTP or SES)."""
    return outbox


def new_key() -> str:
    return f"order-{uuid.uuid4()}"


def send(caller: SyncNats, key: str = "", timeout: float = 10.0, **changes: Any) -> Any:
    body = {**REQUEST, **changes}
    if key:
        body["idempotency_key"] = key
    return caller.request_json(api.SEND_EMAIL_SUBJECT, body, timeout=timeout)


def tracked_ids(smtp: SmtpServer) -> list[str]:
    """The email id of every message the SMTP server accepted."""
    return tracked_email_ids(smtp.messages)


def keyed_requests(relay: RelayProcess) -> float:
    """Requests with a key this replica answered from the bucket or sent."""
    return sum(
        relay.metric("emailrelay_idempotent_replies_total", outcome=outcome)
        for outcome in ("reserved", "completed", "in_progress")
    )


@on_both_transports
def test_same_key_and_request_answers_the_first_reply_and_sends_once(
    sent: Outbox, caller: SyncNats
) -> None:
    key = new_key()
    first = send(caller, key)
    again = send(caller, key)
    assert "email_id" in first
    assert again == first
    assert tracking_ids(sent.messages()) == [first["email_id"]]


def test_two_replicas_racing_on_one_key_send_exactly_one_message(
    smtp: SmtpServer, caller: SyncNats, replicas: list[RelayProcess]
) -> None:
    smtp.latency = 0.5  # every request arrives while the first is still sending
    key = new_key()
    body = {**REQUEST, "idempotency_key": key}
    before = [keyed_requests(relay) for relay in replicas]
    replies = caller.request_many(api.SEND_EMAIL_SUBJECT, [body] * 16, concurrency=16)
    assert all("email_id" in reply for reply in replies), replies
    assert len({reply["email_id"] for reply in replies}) == 1
    assert tracked_ids(smtp) == [replies[0]["email_id"]]
    # Both replicas took some of them (else this proved nothing about a race).
    after = [keyed_requests(relay) for relay in replicas]
    assert all(a > b for a, b in zip(after, before, strict=True))


def test_retry_after_the_first_reply_was_lost_returns_the_same_email_id(
    smtp: SmtpServer, caller: SyncNats
) -> None:
    smtp.latency = 2.0
    key = new_key()
    with pytest.raises(nats.errors.TimeoutError):
        send(caller, key, timeout=0.5)  # the caller gives up; the relay sends on
    retried = send(caller, key)  # waits for the first send's outcome
    assert tracked_ids(smtp) == [retried["email_id"]]
    assert send(caller, key) == retried


@on_both_transports
def test_same_key_with_a_different_request_is_refused(sent: Outbox, caller: SyncNats) -> None:
    key = new_key()
    send(caller, key)
    assert send(caller, key, subject="Another invoice") == {"error": api.ERR_IDEMPOTENCY_KEY_REUSED}
    assert len(sent.messages()) == 1


def test_failed_send_releases_the_key(smtp: SmtpServer, caller: SyncNats) -> None:
    smtp.fail_next_mail(550)
    key = new_key()
    assert send(caller, key) == {"error": api.ERR_DELIVERY_FAILED}
    retried = send(caller, key)
    assert tracked_ids(smtp) == [retried["email_id"]]


def test_connection_dropped_after_data_holds_the_key_as_outcome_unknown(
    smtp: SmtpServer, caller: SyncNats
) -> None:
    smtp.drop_connection_after_data = True
    key = new_key()
    assert send(caller, key) == {"error": api.ERR_DELIVERY_OUTCOME_UNKNOWN}
    smtp.drop_connection_after_data = False
    assert send(caller, key) == {"error": api.ERR_DELIVERY_OUTCOME_UNKNOWN}
    assert len(smtp.messages) == 1


def test_without_a_key_a_dropped_connection_stays_delivery_failed(
    smtp: SmtpServer, caller: SyncNats
) -> None:
    smtp.drop_connection_after_data = True
    assert send(caller) == {"error": api.ERR_DELIVERY_FAILED}


def test_deadline_passing_after_data_began_holds_the_key_as_outcome_unknown(
    smtp: SmtpServer, caller: SyncNats
) -> None:
    # Longer than the caller's deadline plus the relay's wait for a DATA reply;
    # the deadline leaves a busy machine 3 s to bring the send to DATA.
    smtp.latency = 3.0 + DATA_REPLY_WAIT + 1.5
    key = new_key()
    deadline = str(int((time.time() + 3.0) * 1000))
    body = {**REQUEST, "idempotency_key": key}
    reply = caller.request_json(
        api.SEND_EMAIL_SUBJECT, body, timeout=15, headers={api.DEADLINE_HEADER: deadline}
    )
    assert reply == {"error": api.ERR_DELIVERY_OUTCOME_UNKNOWN}
    smtp.latency = 0.0
    assert send(caller, key) == {"error": api.ERR_DELIVERY_OUTCOME_UNKNOWN}


@on_both_transports
def test_the_header_is_the_same_key_as_the_field(sent: Outbox, caller: SyncNats) -> None:
    key = new_key()
    first = send(caller, key)
    by_header = caller.request_json(
        api.SEND_EMAIL_SUBJECT, REQUEST, headers={api.IDEMPOTENCY_HEADER: key}
    )
    assert by_header == first
    assert len(sent.messages()) == 1


def test_header_and_field_that_differ_are_an_invalid_payload(
    smtp: SmtpServer, caller: SyncNats
) -> None:
    body = {**REQUEST, "idempotency_key": new_key()}
    reply = caller.request_json(
        api.SEND_EMAIL_SUBJECT, body, headers={api.IDEMPOTENCY_HEADER: new_key()}
    )
    assert reply == {"error": api.ERR_INVALID_PAYLOAD}
    assert smtp.messages == []


def test_a_padded_key_in_field_and_header_is_one_key(smtp: SmtpServer, caller: SyncNats) -> None:
    key = f" {new_key()} "
    body = {**REQUEST, "idempotency_key": key}
    first = caller.request_json(api.SEND_EMAIL_SUBJECT, body, headers={api.IDEMPOTENCY_HEADER: key})
    assert "email_id" in first
    assert send(caller, key.strip()) == first
    assert len(smtp.messages) == 1


def test_a_blank_idempotency_header_is_an_invalid_payload_and_sends_nothing(
    smtp: SmtpServer, caller: SyncNats
) -> None:
    reply = caller.request_json(
        api.SEND_EMAIL_SUBJECT, REQUEST, headers={api.IDEMPOTENCY_HEADER: "   "}
    )
    assert reply == {"error": api.ERR_INVALID_PAYLOAD}
    assert send(caller, "  \t ") == {"error": api.ERR_INVALID_PAYLOAD}
    assert smtp.messages == []


def test_a_key_longer_than_256_characters_is_an_invalid_payload(
    smtp: SmtpServer, caller: SyncNats
) -> None:
    assert send(caller, "k" * 257) == {"error": api.ERR_INVALID_PAYLOAD}
    assert "email_id" in send(caller, "k" * 256)


def test_a_contract_error_does_not_hold_the_key(smtp: SmtpServer, caller: SyncNats) -> None:
    key = new_key()
    assert send(caller, key, to="not an address") == {"error": api.ERR_INVALID_TO}
    assert "email_id" in send(caller, key)


def test_the_bucket_is_created_with_the_idempotency_ttl(
    caller: SyncNats, replicas: list[RelayProcess]
) -> None:
    async def max_age() -> float:
        info = await caller.js.stream_info(f"KV_{api.IDEMPOTENCY_BUCKET}")
        return float(info.config.max_age or 0)

    assert caller.run(max_age()) == 24 * 3600


def test_the_entry_holds_no_request_content(caller: SyncNats, smtp: SmtpServer) -> None:
    key = new_key()
    send(caller, key, subject="Secret subject")

    async def values() -> list[bytes]:
        kv = await caller.js.key_value(api.IDEMPOTENCY_BUCKET)
        return [(await kv.get(k)).value or b"" for k in await kv.keys()]

    stored = caller.run(values())
    assert stored
    assert not any(b"Secret subject" in v or key.encode() in v for v in stored)
    assert all(json.loads(v)["v"] == 1 for v in stored)


@on_both_transports
async def test_the_client_sends_once_per_key(module_nats_server: NatsServer, sent: Outbox) -> None:
    key = new_key()
    async with EmailRelayClient.connect(servers=module_nats_server.url) as client:
        first = await client.send(idempotency_key=key, **REQUEST)
        again = await client.send(idempotency_key=key, **REQUEST)
    assert again == first
    assert tracking_ids(sent.messages()) == [first.email_id]


@on_both_transports
def test_the_cli_sends_once_per_key(module_nats_server: NatsServer, sent: Outbox) -> None:
    key = new_key()
    command = [
        sys.executable,
        "-m",
        "emailrelay",
        "send",
        "--server",
        module_nats_server.url,
        "--json",
    ]
    for name, value in REQUEST.items():
        command += [f"--{name}", value]
    outputs = [
        subprocess.run(
            [*command, "--idempotency-key", key], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert json.loads(outputs[0]) == json.loads(outputs[1])
    assert len(sent.messages()) == 1
