"""``suppression.list`` pages cost about the page: the store follows the
bucket's writes (any replica's) instead of reading the whole list for every
page, and removal tombstones never count toward offsets.

Fast tests over the in-memory KV (which counts the values each read hands
out), then the same store against a real nats-server with 10,000 entries.
The timing, next to the old way's, is in benchmarks/bench_suppression_list.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import anyio
import pytest

from emailrelay import api
from emailrelay.app import suppression_routes
from emailrelay.deadline import Deadline
from emailrelay.store.buckets import SUPPRESSIONS, BucketPolicy, ReopeningBucket
from emailrelay.store.kv import Changes, ListableKeyValue
from emailrelay.store.suppressions import (
    Suppression,
    SuppressionReason,
    SuppressionStore,
    suppression_key,
)
from tests.support.fakes import MemoryBuckets, MemoryKeyValue
from tests.support.jetstream_kv import replicas_on_one_bucket
from tests.support.servers.nats import NatsServer

NOW = datetime(2024, 5, 1, tzinfo=UTC)
TOMBSTONE = json.dumps({"removed_at": "2024-05-02T00:00:00Z"}).encode()


def address(n: int) -> str:
    return f"user{n:05d}@example.org"


def entry(n: int) -> bytes:
    return Suppression(address(n), SuppressionReason.BOUNCE, NOW).to_json()


def filled(count: int, removed: frozenset[int] = frozenset()) -> MemoryKeyValue:
    kv = MemoryKeyValue()
    for n in range(count):
        kv.put(suppression_key(address(n)), TOMBSTONE if n in removed else entry(n))
    return kv


def listed_in_key_order(count: int, removed: frozenset[int] = frozenset()) -> list[str]:
    kept = [address(n) for n in range(count) if n not in removed]
    return sorted(kept, key=suppression_key)


async def test_a_page_far_into_the_list_reads_about_the_page() -> None:
    kv = filled(3000)
    store = SuppressionStore(kv)
    await store.page(limit=1)  # the process's first page reads the list once
    kv.values_read = 0
    page, more = await store.page(limit=100, offset=2900)
    assert [s.address for s in page] == listed_in_key_order(3000)[2900:]
    assert not more
    assert kv.values_read == 100


async def test_pages_cover_every_entry_once_in_key_order() -> None:
    store = SuppressionStore(filled(2500))
    seen: list[str] = []
    offset, more = 0, True
    while more:
        page, more = await store.page(limit=300, offset=offset)
        seen += [s.address for s in page]
        offset += 300
    assert seen == listed_in_key_order(2500)


async def test_removal_tombstones_do_not_count_toward_offsets() -> None:
    removed = frozenset({1, 5, 6})
    store = SuppressionStore(filled(20, removed))
    page, more = await store.page(limit=17)
    assert [s.address for s in page] == listed_in_key_order(20, removed)
    assert not more


async def test_an_address_removed_after_the_first_page_shifts_the_next_pages() -> None:
    kv = filled(10)
    store = SuppressionStore(kv)
    first, _ = await store.page(limit=5)
    await store.remove(first[0].address)
    second, more = await store.page(limit=5, offset=4)
    assert [s.address for s in second] == listed_in_key_order(10)[5:]
    assert not more


async def test_an_address_another_replica_added_is_on_the_next_page() -> None:
    kv = filled(10)
    reader, writer = SuppressionStore(kv), SuppressionStore(kv)
    await reader.page(limit=100)
    await writer.add(Suppression(address(99), SuppressionReason.MANUAL, NOW))
    kv.values_read = 0
    page, _ = await reader.page(limit=100)
    assert address(99) in [s.address for s in page]
    assert kv.values_read == 1 + 11  # the one new write, then the page


async def test_more_is_false_exactly_on_the_last_page() -> None:
    store = SuppressionStore(filled(1000))
    assert (await store.page(limit=1000))[1] is False
    assert (await store.page(limit=999))[1] is True


async def test_a_re_created_bucket_is_listed_afresh() -> None:
    buckets = MemoryBuckets(SUPPRESSIONS.name)
    old = buckets.buckets[SUPPRESSIONS.name]
    for n in range(5):
        old.put(suppression_key(address(n)), entry(n))
    bucket = ReopeningBucket(buckets, SUPPRESSIONS, BucketPolicy(auto_create=True), old)
    store = SuppressionStore(bucket)
    assert len((await store.page())[0]) == 5
    buckets.delete(SUPPRESSIONS.name)
    fresh = buckets.declare(SUPPRESSIONS.name)
    fresh.put(suppression_key(address(42)), entry(42))
    page, _ = await store.page()
    assert [s.address for s in page] == [address(42)]


class StallingKeyValue(MemoryKeyValue):
    """A store that never answers a read of its changes."""

    async def changes(self, after: int) -> Changes:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_page_cut_off_by_its_deadline_answers_overloaded_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    route = suppression_routes(SuppressionStore(StallingKeyValue()))
    reply = await route[api.SUPPRESSION_LIST_SUBJECT](b"{}", Deadline.after(0.05), {})
    assert reply == api.ErrorReply(error=api.ERR_OVERLOADED)
    assert "request cut off at its deadline" in caplog.text


# --- against nats-server ----------------------------------------------------------

BIG = 10_000
REMOVED = frozenset(range(0, BIG, 97))


async def fill(kv: ListableKeyValue) -> None:
    """Write the entries straight into the bucket, as many replicas' bounces would."""
    limiter = anyio.CapacityLimiter(64)

    async def put(n: int) -> None:
        async with limiter:
            await kv.create(suppression_key(address(n)), TOMBSTONE if n in REMOVED else entry(n))

    async with anyio.create_task_group() as tg:
        for n in range(BIG):
            tg.start_soon(put, n)


async def test_a_page_at_offset_9000_of_10000_is_right_on_nats_server(
    nats_server: NatsServer,
) -> None:
    async with replicas_on_one_bucket(nats_server.url, SUPPRESSIONS, count=1) as (kv,):
        await fill(kv)
        expected = listed_in_key_order(BIG, REMOVED)
        store = SuppressionStore(kv)
        page, more = await store.page(limit=100, offset=9000)
        assert [s.address for s in page] == expected[9000:9100]
        assert more is (len(expected) > 9100)


async def test_twenty_concurrent_pages_agree_with_the_list_on_nats_server(
    nats_server: NatsServer,
) -> None:
    async with replicas_on_one_bucket(nats_server.url, SUPPRESSIONS, count=1) as (kv,):
        await fill(kv)
        expected = listed_in_key_order(BIG, REMOVED)
        store = SuppressionStore(kv)
        pages: dict[int, list[str]] = {}

        async def read(offset: int) -> None:
            page, _ = await store.page(limit=100, offset=offset)
            pages[offset] = [s.address for s in page]

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(read, 9000 - 100 * n)
        assert all(pages[offset] == expected[offset : offset + 100] for offset in pages)
