"""Heavy tracking cases (``nox -s scale``): three relay processes appending to
one hot group, and a 50,000-email group paged end to end."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import anyio
import pytest
import trio
import trio_asyncio

from emailrelay import api
from emailrelay.bridge.nats import NatsConnection
from emailrelay.store.keys import group_key
from emailrelay.store.tracking import TrackingStore
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import running_relay
from tests.support.servers.smtp import SmtpServer
from tests.support.tracking_calls import analytics, status

pytestmark = pytest.mark.scale


def test_three_relays_sending_to_one_group_lose_no_id(smtp_server: SmtpServer) -> None:
    group = f"hot {uuid.uuid4()}"
    payloads: list[object] = [
        send_request(to=f"user{n}@example.org", group_id=group) for n in range(2000)
    ]
    with (
        NatsServer() as server,
        SyncNats(server.url) as client,
        running_relay(server, smtp_server),
        running_relay(server, smtp_server),
        running_relay(server, smtp_server),
    ):
        replies = client.request_many(api.SEND_EMAIL_SUBJECT, payloads, concurrency=64, timeout=120)
        sent = {reply["email_id"] for reply in replies}
        assert len(sent) == 2000
        indexed = [
            r["email_id"]
            for page in range(2)
            for r in status(client, group_id=group, limit=1000, offset=page * 1000)
        ]
        assert Counter(indexed) == Counter(sent)
        assert analytics(client, group_id=group)["total_sent"] == 2000


GROUP_SIZE = 50_000


def flags(n: int) -> dict[str, object]:
    """Deterministic engagement for email number ``n``."""
    at = datetime(2024, 5, 1, 10, tzinfo=UTC)
    result: dict[str, object] = {}
    if n % 10 == 0:
        result |= {"delivered": True, "delivered_at": at}
    if n % 25 == 0:
        opens = [{"event_id": f"m{n}-{k}", "opened_at": at} for k in range(n % 3 + 1)]
        result |= {"opened": True, "open_count": len(opens), "opened_at_list": opens}
    if n % 100 == 7:
        result |= {"failed": True, "failed_at": at}
    return result


async def write_big_group(url: str, group: str, email_ids: list[str]) -> None:
    """Records and index of one large group, written through the store."""
    async with trio_asyncio.open_loop():
        nats = await NatsConnection.connect([url], None, give_up_after=10)
        records = await nats.create_key_value(api.RECIPIENTS_BUCKET, 64 * 1024, 1)
        groups = await nats.create_key_value(api.GROUP_INDEX_BUCKET, 1024 * 1024, 1)
        store = TrackingStore(records, groups)
        limiter = anyio.CapacityLimiter(64)

        async def write(n: int) -> None:
            async with limiter:
                record = api.TrackingRecord.model_validate(
                    {
                        "group_id": group,
                        "email_id": email_ids[n],
                        "to": f"user{n}@example.org",
                        "subject": "invitation",
                        "sent_at": datetime(2024, 5, 1, tzinfo=UTC),
                        **flags(n),
                    }
                )
                await store.create_record(record)
                await store.append_to_group(group, email_ids[n])

        async with anyio.create_task_group() as tg:
            for n in range(len(email_ids)):
                tg.start_soon(write, n)
        await nats.drain()


@pytest.fixture
def big_group_server() -> Iterator[tuple[NatsServer, str, list[str]]]:
    """A nats-server holding one 50,000-email group."""
    group = f"big invite {uuid.uuid4()}"
    email_ids = [str(uuid.uuid4()) for _ in range(GROUP_SIZE)]
    with NatsServer() as server:
        trio.run(write_big_group, server.url, group, email_ids)
        yield server, group, email_ids


def test_fifty_thousand_email_group_pages_analyses_and_refuses_one_reply(
    big_group_server: tuple[NatsServer, str, list[str]], smtp_server: SmtpServer
) -> None:
    server, group, email_ids = big_group_server
    with SyncNats(server.url) as client, running_relay(server, smtp_server):
        seen: list[str] = []
        for offset in range(0, GROUP_SIZE + 1000, 1000):
            page = status(client, group_id=group, limit=1000, offset=offset)
            seen.extend(record["email_id"] for record in page)
        assert len(seen) == GROUP_SIZE
        assert Counter(seen) == Counter(email_ids)
        head = json.loads(client.kv_get(api.GROUP_INDEX_BUCKET, group_key(group)) or b"null")
        assert head == seen[:1000]  # the documented plain array, for existing readers

        # No click is written here, so the click counts (an addition) stay 0.
        expected = {
            "delivered": 0,
            "opened": 0,
            "unique_opened": 0,
            "failed": 0,
            "clicked": 0,
            "unique_clicked": 0,
        }
        for n in range(GROUP_SIZE):
            f = flags(n)
            expected["delivered"] += bool(f.get("delivered"))
            expected["opened"] += int(f.get("open_count", 0))  # type: ignore[call-overload]
            expected["unique_opened"] += bool(f.get("opened"))
            expected["failed"] += bool(f.get("failed"))
        reply = analytics(client, group_id=group)
        assert reply == {"group_id": group, "total_sent": GROUP_SIZE, **expected}

        assert status(client, group_id=group) == {"error": api.ERR_GROUP_TOO_LARGE}
