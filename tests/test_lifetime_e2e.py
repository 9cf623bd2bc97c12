"""``RETENTION`` end to end: a relay process that created its buckets with a
short ``max_age``, its own nats-server, and the tracking store writing a big
group in this process (a thousand sends per index page would be slow). Records
expire and answer ``not found``; a group whose head and oldest pages expired
while it kept growing lists what remains, in order, and pages and counts it
correctly; a relay finding a bucket with another ``max_age`` says so once."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

import pytest
import trio
import trio_asyncio

from emailrelay import api
from emailrelay.bridge.nats import NatsConnection
from emailrelay.store.index import HEAD_CAPACITY, PAGE_CAPACITY
from emailrelay.store.keys import group_key, index_page_key, index_range_key
from emailrelay.store.tracking import TrackingStore
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer
from tests.support.tracking_calls import analytics, send, status, unique_group
from tests.support.waiting import wait_until

RETENTION = 4.0


@pytest.fixture(scope="module")
def relay(module_nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    env = {"RETENTION": f"{RETENTION:g}s"}
    with running_relay(module_nats_server, smtp_server, env) as process:
        yield process


@pytest.fixture
def client(relay: RelayProcess, module_nats_client: SyncNats) -> SyncNats:
    return module_nats_client


def with_store(url: str, work: Callable[[TrackingStore], Awaitable[None]]) -> None:
    """Run ``work`` against the relay's own buckets, through the tracking store."""

    async def main() -> None:
        async with trio_asyncio.open_loop():
            nats = await NatsConnection.connect([url], None, give_up_after=10)
            try:
                records = await nats.key_value(api.RECIPIENTS_BUCKET)
                groups = await nats.key_value(api.GROUP_INDEX_BUCKET)
                assert records is not None
                assert groups is not None
                await work(TrackingStore(records, groups, expiring=True))
            finally:
                await nats.drain()

    trio.run(main)


def append(url: str, group: str, email_ids: list[str]) -> None:
    async def work(store: TrackingStore) -> None:
        for email_id in email_ids:
            await store.create_record(
                api.TrackingRecord(
                    group_id=group,
                    email_id=email_id,
                    to="someone@example.org",
                    subject="s",
                    sent_at=datetime.now(UTC),
                )
            )
            await store.append_to_group(group, email_id)

    with_store(url, work)


def group_ids(url: str, group: str) -> list[str] | None:
    found: list[list[str] | None] = []

    async def work(store: TrackingStore) -> None:
        found.append(await store.group_ids(group))

    with_store(url, work)
    return found[0]


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def test_relay_creates_the_tracking_buckets_with_retention_as_max_age(
    client: SyncNats,
) -> None:
    async def max_age(bucket: str) -> float:
        info = await client.js.stream_info(f"KV_{bucket}")
        return float(info.config.max_age or 0)

    ages = {b: client.run(max_age(b)) for b in (api.RECIPIENTS_BUCKET, api.GROUP_INDEX_BUCKET)}
    assert ages == {api.RECIPIENTS_BUCKET: RETENTION, api.GROUP_INDEX_BUCKET: RETENTION}


def test_expired_record_answers_not_found(client: SyncNats) -> None:
    group = unique_group("expiring")
    email_id = send(client, group)["email_id"]
    assert status(client, email_id=email_id)["email_id"] == email_id
    wait_until(
        lambda: status(client, email_id=email_id) == {"error": api.ERR_NOT_FOUND},
        timeout=RETENTION + 10,
        message="the record did not expire",
    )
    wait_until(  # the index entry was written just after the record
        lambda: status(client, group_id=group) == {"error": api.ERR_NOT_FOUND},
        timeout=5,
        message="the group did not expire",
    )


def test_group_growing_while_its_oldest_pages_expire_stays_consistent(
    client: SyncNats, module_nats_server: NatsServer
) -> None:
    url, group = module_nats_server.url, unique_group("growing")
    head, page_one, page_two = ids(HEAD_CAPACITY), ids(PAGE_CAPACITY), ids(300)
    append(url, group, head)
    time.sleep(RETENTION / 2)  # spacing the writes so that the head expires first
    append(url, group, page_one + page_two)

    wait_until(
        lambda: client.kv_get(api.GROUP_INDEX_BUCKET, group_key(group)) is None,
        timeout=RETENTION + 10,
        message="the head did not expire",
    )
    remaining = page_one + page_two
    assert group_ids(url, group) == remaining
    assert analytics(client, group_id=group)["total_sent"] == len(remaining)
    page = status(client, group_id=group, offset=995, limit=10)
    assert [r["email_id"] for r in page] == remaining[995:1005]

    later = ids(5)
    append(url, group, later)
    assert client.kv_get(api.GROUP_INDEX_BUCKET, group_key(group)) is None  # no new head
    assert group_ids(url, group) == remaining + later

    wait_until(
        lambda: client.kv_get(api.GROUP_INDEX_BUCKET, index_page_key(group, 1)) is None,
        timeout=RETENTION + 10,
        message="page 1 did not expire",
    )
    assert group_ids(url, group) == page_two + later
    assert analytics(client, group_id=group)["total_sent"] == len(page_two) + len(later)
    range_key = client.kv_get(api.GROUP_INDEX_BUCKET, index_range_key(group))
    assert range_key is not None
    assert json.loads(range_key)["last"] == 2


def test_whole_group_expires_once_it_stops_growing(
    client: SyncNats, module_nats_server: NatsServer
) -> None:
    group = unique_group("stopped")
    append(module_nats_server.url, group, ids(HEAD_CAPACITY + 10))
    wait_until(
        lambda: analytics(client, group_id=group) == {"error": api.ERR_NOT_FOUND},
        timeout=RETENTION + 10,
        message="the group did not expire",
    )
    assert client.kv_get(api.GROUP_INDEX_BUCKET, index_range_key(group)) is None


def test_relay_warns_once_when_an_existing_bucket_has_another_max_age(
    client: SyncNats, module_nats_server: NatsServer, smtp_server: SmtpServer
) -> None:
    with running_relay(module_nats_server, smtp_server, {"RETENTION": "10s"}) as other:
        logs = other.logs()
    warnings = [line for line in logs.splitlines() if "max_age differs from RETENTION" in line]
    assert len([w for w in warnings if api.RECIPIENTS_BUCKET in w]) == 1
    assert '"bucket_max_age": 4.0' in warnings[0]
    assert '"retention": 10.0' in warnings[0]


def test_an_engagement_update_restarts_a_records_clock(
    client: SyncNats, module_nats_server: NatsServer
) -> None:
    email_id = send(client, unique_group("engaged"))["email_id"]
    sent_at = time.monotonic()
    time.sleep(RETENTION * 0.6)  # an engagement event arrives later in the record's life

    async def deliver(store: TrackingStore) -> None:
        def mark(record: api.TrackingRecord) -> bool:
            record.delivered, record.delivered_at = True, datetime.now(UTC)
            return True

        assert await store.update_record(email_id, mark) is not None

    with_store(module_nats_server.url, deliver)
    time.sleep(max(0.0, sent_at + RETENTION + 1.0 - time.monotonic()))  # past the first expiry
    assert status(client, email_id=email_id)["delivered"] is True
    wait_until(
        lambda: status(client, email_id=email_id) == {"error": api.ERR_NOT_FOUND},
        timeout=RETENTION + 10,
        message="the updated record did not expire",
    )
