"""``emailrelay.client.EmailRelayClient`` against a real relay, under trio and asyncio.

Async tests run on trio (pytest trio_mode); the asyncio tests are plain
functions that run a coroutine on a genuine asyncio loop (``run_on_asyncio``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import nats
import pytest
import trio

from emailrelay import api
from emailrelay.client import (
    ERRORS,
    EmailRelayClient,
    EmailRelayError,
    FromDomainNotAllowed,
    GroupTooLarge,
    MissingFields,
    NotFound,
    RelayUnavailable,
    UnexpectedReply,
    decode_reply,
)
from tests.support.nats_client import silent_subscriber
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import LOOPBACK, free_port

T = TypeVar("T")


@pytest.fixture(scope="module")
def relay(nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    """One relay for the module, sending to ``smtp_server`` without TLS."""
    with running_relay(nats_server, smtp_server) as process:
        yield process


def run_on_asyncio(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run`` on a plain selector loop. Once trio_asyncio is imported
    (any test that loads the relay's code does), it replaces the event loop
    policy, and a bare ``asyncio.run`` would run on its greenlet-based loop
    instead of the asyncio that real callers use."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


# --- pure logic ------------------------------------------------------------------


def test_every_contract_error_string_has_its_own_exception() -> None:
    strings = [value for name, value in vars(api).items() if name.startswith("ERR_")]
    assert set(strings) <= set(ERRORS)
    classes = [ERRORS[s] for s in strings]
    assert len(set(classes)) == len(classes)
    assert all(issubclass(c, EmailRelayError) and c is not EmailRelayError for c in classes)


def test_unknown_error_string_raises_the_base_error() -> None:
    with pytest.raises(EmailRelayError) as caught:
        decode_reply(b'{"error": "something new"}')
    assert type(caught.value) is EmailRelayError
    assert caught.value.error == "something new"


def test_non_json_reply_raises_unexpected_reply() -> None:
    with pytest.raises(UnexpectedReply):
        decode_reply(b"<html>")


# --- under trio ------------------------------------------------------------------


async def test_send_under_trio_delivers_and_returns_the_ids(
    relay: RelayProcess, nats_server: NatsServer, smtp: SmtpServer
) -> None:
    async with EmailRelayClient.connect(servers=nats_server.url) as client:
        reply = await client.send(**send_request(group_id="trio-send"))
    assert isinstance(reply, api.SendEmailReply)
    assert reply.group_id == "trio-send"
    assert uuid.UUID(reply.email_id).version == 4
    [message] = await trio.to_thread.run_sync(smtp.wait_for_messages, 1)
    assert f"trio-send/{reply.email_id}".encode() in message.raw


async def test_status_under_trio_returns_the_tracking_record(
    relay: RelayProcess, nats_server: NatsServer, smtp: SmtpServer
) -> None:
    async with EmailRelayClient.connect(servers=nats_server.url) as client:
        sent = await client.send(**send_request(to="someone@example.com", subject="Status by id"))
        record = await client.status(sent.email_id)
    assert isinstance(record, api.TrackingRecord)
    assert (record.email_id, record.group_id) == (sent.email_id, sent.group_id)
    assert (record.to, record.subject) == ("someone@example.com", "Status by id")


async def test_group_status_under_trio_pages_in_send_order(
    relay: RelayProcess, nats_server: NatsServer, smtp: SmtpServer
) -> None:
    group = f"paged-{uuid.uuid4()}"
    async with EmailRelayClient.connect(servers=nats_server.url) as client:
        ids = [(await client.send(**send_request(group_id=group))).email_id for _ in range(3)]
        everything = await client.group_status(group)
        page = await client.group_status(group, limit=2, offset=1)
    assert [r.email_id for r in everything] == ids
    assert [r.email_id for r in page] == ids[1:3]


async def test_analytics_under_trio_counts_the_group(
    relay: RelayProcess, nats_server: NatsServer, smtp: SmtpServer
) -> None:
    group = f"counted-{uuid.uuid4()}"
    async with EmailRelayClient.connect(servers=nats_server.url) as client:
        for _ in range(2):
            await client.send(**send_request(group_id=group))
        counts = await client.analytics(group)
    assert isinstance(counts, api.EngagementAnalyticsReply)
    assert (counts.group_id, counts.total_sent, counts.opened, counts.failed) == (group, 2, 0, 0)


async def test_error_reply_under_trio_raises_its_typed_exception(
    relay: RelayProcess, nats_server: NatsServer
) -> None:
    async with EmailRelayClient.connect(servers=nats_server.url) as client:
        with pytest.raises(FromDomainNotAllowed) as caught:
            await client.send(**send_request(), from_="someone@evil.example")
    assert caught.value.error == api.ERR_FROM_DOMAIN_NOT_ALLOWED


async def test_unknown_email_id_under_trio_raises_not_found(
    relay: RelayProcess, nats_server: NatsServer
) -> None:
    async with EmailRelayClient.connect(servers=nats_server.url) as client:
        with pytest.raises(NotFound):
            await client.status(str(uuid.uuid4()))


def test_unpaged_big_group_raises_group_too_large(
    relay: RelayProcess, nats_server: NatsServer
) -> None:
    group = f"big-{uuid.uuid4()}"
    # 20 records of ~60 KB each (long subjects) are more than one NATS message
    # (1 MB) can carry. Written straight into the buckets.
    ids = [str(uuid.uuid4()) for _ in range(20)]

    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            records = await nc.jetstream().key_value(api.RECIPIENTS_BUCKET)
            for email_id in ids:
                record = api.TrackingRecord(
                    group_id=group,
                    email_id=email_id,
                    to="someone@example.com",
                    subject="x" * 60_000,
                    sent_at=datetime.now(UTC),
                )
                await records.put(email_id, record.to_json())
            index = await nc.jetstream().key_value(api.GROUP_INDEX_BUCKET)
            await index.put(group, json.dumps(ids).encode())
        finally:
            await nc.close()
        async with EmailRelayClient.connect(servers=nats_server.url) as client:
            await client.group_status(group)

    with pytest.raises(GroupTooLarge):
        run_on_asyncio(scenario)


async def test_no_responders_under_trio_raises_relay_unavailable(nats_server: NatsServer) -> None:
    async with EmailRelayClient.connect(servers=nats_server.url) as client:
        with pytest.raises(RelayUnavailable, match="no relay is serving"):
            await client.request("emailrelay.tests.nobody-here", {})


async def test_silent_responder_under_trio_raises_relay_unavailable_after_timeout(
    nats_server: NatsServer,
) -> None:
    subject = "emailrelay.tests.silent"
    async with (
        silent_subscriber(nats_server.url, subject),
        EmailRelayClient.connect(servers=nats_server.url, timeout=0.3) as client,
    ):
        with pytest.raises(RelayUnavailable, match="no reply"):
            await client.request(subject, {})


async def test_unreachable_nats_under_trio_raises_relay_unavailable() -> None:
    with pytest.raises(RelayUnavailable, match="cannot reach NATS"):
        async with EmailRelayClient.connect(
            servers=f"nats://{LOOPBACK}:{free_port()}", connect_timeout=0.5
        ):
            pass


# --- under asyncio ---------------------------------------------------------------


def test_send_and_status_under_asyncio(
    relay: RelayProcess, nats_server: NatsServer, smtp: SmtpServer
) -> None:
    async def scenario() -> tuple[api.SendEmailReply, api.TrackingRecord]:
        async with EmailRelayClient.connect(servers=nats_server.url) as client:
            sent = await client.send(**send_request(group_id="asyncio-send"))
            return sent, await client.status(sent.email_id)

    sent, record = run_on_asyncio(scenario)
    assert record.email_id == sent.email_id
    [message] = smtp.wait_for_messages(1)
    assert f"asyncio-send/{sent.email_id}".encode() in message.raw


def test_group_status_and_analytics_under_asyncio(
    relay: RelayProcess, nats_server: NatsServer, smtp: SmtpServer
) -> None:
    group = f"asyncio-{uuid.uuid4()}"

    async def scenario() -> tuple[list[api.TrackingRecord], api.EngagementAnalyticsReply]:
        async with EmailRelayClient.connect(servers=nats_server.url) as client:
            await client.send(**send_request(group_id=group))
            return await client.group_status(group), await client.analytics(group)

    records, counts = run_on_asyncio(scenario)
    assert [r.group_id for r in records] == [group]
    assert counts.total_sent == 1


def test_error_reply_under_asyncio_raises_its_typed_exception(
    relay: RelayProcess, nats_server: NatsServer
) -> None:
    async def scenario() -> None:
        async with EmailRelayClient.connect(servers=nats_server.url) as client:
            await client.send(**send_request(html=""))

    with pytest.raises(MissingFields):
        run_on_asyncio(scenario)


def test_unreachable_nats_under_asyncio_raises_relay_unavailable() -> None:
    async def scenario() -> None:
        async with EmailRelayClient.connect(
            servers=f"nats://{LOOPBACK}:{free_port()}", connect_timeout=0.5
        ):
            pass

    with pytest.raises(RelayUnavailable):
        run_on_asyncio(scenario)


def test_no_responders_under_asyncio_raises_relay_unavailable(nats_server: NatsServer) -> None:
    async def scenario() -> None:
        async with EmailRelayClient.connect(servers=nats_server.url) as client:
            await client.request("emailrelay.tests.nobody-here", {})

    with pytest.raises(RelayUnavailable):
        run_on_asyncio(scenario)
