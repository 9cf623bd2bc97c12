"""Opening the tracking buckets, and opening them again when they vanish while
the relay runs, over in-memory buckets. End to end against nats-server:
test_tracking_recovery.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import anyio
import pytest
import trio

from emailrelay.api import (
    GROUP_INDEX_BUCKET,
    RECIPIENT_INDEX_BUCKET,
    RECIPIENTS_BUCKET,
    TrackingRecord,
)
from emailrelay.store.buckets import (
    GROUP_INDEX,
    RECIPIENTS,
    BucketPolicy,
    ReopeningBucket,
    open_tracking_store,
)
from emailrelay.store.kv import BucketMissing, StoreError
from emailrelay.store.tracking import TrackingStore
from tests.support.fakes import CreatedBucket, MemoryBuckets

AUTO_CREATE = BucketPolicy(auto_create=True, replicas=3)
NO_CREATE = BucketPolicy(auto_create=False)


def record(group_id: str = "g") -> TrackingRecord:
    return TrackingRecord(
        group_id=group_id,
        email_id=str(uuid.uuid4()),
        to="someone@example.org",
        subject="hello",
        sent_at=datetime(2024, 5, 1, tzinfo=UTC),
    )


async def open_store(host: MemoryBuckets, policy: BucketPolicy) -> TrackingStore:
    store = await open_tracking_store(host, policy)
    assert store is not None
    return store


# --- at start --------------------------------------------------------------


async def test_missing_buckets_are_created_with_the_deployments_settings() -> None:
    host = MemoryBuckets()
    await open_store(host, AUTO_CREATE)
    assert host.created == [
        CreatedBucket(RECIPIENTS_BUCKET, 64 * 1024, 3),
        CreatedBucket(GROUP_INDEX_BUCKET, 1024 * 1024, 3),
        CreatedBucket(RECIPIENT_INDEX_BUCKET, 1024 * 1024, 3),
    ]


async def test_retention_is_the_max_age_of_the_tracking_buckets_created() -> None:
    host = MemoryBuckets()
    store = await open_tracking_store(host, AUTO_CREATE, retention=30.0)
    assert store is not None
    assert {c.name: c.max_age for c in host.created} == {
        RECIPIENTS_BUCKET: 30.0,
        GROUP_INDEX_BUCKET: 30.0,
        RECIPIENT_INDEX_BUCKET: 30.0,
    }


async def test_missing_recipient_index_leaves_tracking_on() -> None:
    host = MemoryBuckets(RECIPIENTS_BUCKET, GROUP_INDEX_BUCKET)
    store = await open_tracking_store(host, NO_CREATE)
    assert store is not None
    await store.create_record(record())


async def test_existing_buckets_are_opened_not_created() -> None:
    host = MemoryBuckets(RECIPIENTS_BUCKET, GROUP_INDEX_BUCKET, RECIPIENT_INDEX_BUCKET)
    await open_store(host, AUTO_CREATE)
    assert host.created == []


async def test_missing_bucket_without_auto_create_turns_tracking_off() -> None:
    host = MemoryBuckets(RECIPIENTS_BUCKET)
    assert await open_tracking_store(host, NO_CREATE) is None


async def test_unavailable_jetstream_turns_tracking_off() -> None:
    host = MemoryBuckets(RECIPIENTS_BUCKET, GROUP_INDEX_BUCKET)
    host.jetstream_down = True
    assert await open_tracking_store(host, AUTO_CREATE) is None


# --- deleted while running -------------------------------------------------


async def test_group_index_deleted_while_running_is_recreated_and_the_append_lands() -> None:
    host = MemoryBuckets()
    store = await open_store(host, AUTO_CREATE)
    host.delete(GROUP_INDEX_BUCKET)
    await store.append_to_group("g", "e1")
    assert await store.group_ids("g") == ["e1"]
    assert [c.name for c in host.created].count(GROUP_INDEX_BUCKET) == 2


async def test_recreated_bucket_has_the_deployments_settings() -> None:
    host = MemoryBuckets()
    store = await open_store(host, AUTO_CREATE)
    host.delete(RECIPIENTS_BUCKET)
    await store.create_record(record())
    assert host.created[-1] == CreatedBucket(RECIPIENTS_BUCKET, 64 * 1024, 3)


async def test_records_bucket_deleted_while_running_is_recreated_and_the_record_lands() -> None:
    host = MemoryBuckets()
    store = await open_store(host, AUTO_CREATE)
    host.delete(RECIPIENTS_BUCKET)
    sent = record()
    await store.create_record(sent)
    assert await store.get_record(sent.email_id) == sent


async def test_read_from_a_deleted_bucket_answers_from_the_recreated_one() -> None:
    host = MemoryBuckets()
    store = await open_store(host, AUTO_CREATE)
    await store.append_to_group("g", "e1")
    host.delete(GROUP_INDEX_BUCKET)
    assert await store.group_ids("g") is None


async def test_many_calls_finding_the_bucket_gone_recreate_it_once() -> None:
    host = MemoryBuckets()
    store = await open_store(host, AUTO_CREATE)
    host.delete(GROUP_INDEX_BUCKET)
    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(store.append_to_group, f"g{n}", f"e{n}")
    assert [c.name for c in host.created].count(GROUP_INDEX_BUCKET) == 2
    assert [await store.group_ids(f"g{n}") for n in range(50)] == [[f"e{n}"] for n in range(50)]


async def test_bucket_redeclared_by_an_operator_is_reopened_without_auto_create() -> None:
    host = MemoryBuckets(RECIPIENTS_BUCKET, GROUP_INDEX_BUCKET)
    store = await open_store(host, NO_CREATE)
    host.delete(GROUP_INDEX_BUCKET)
    host.declare(GROUP_INDEX_BUCKET)
    await store.append_to_group("g", "e1")
    assert await store.group_ids("g") == ["e1"]
    assert host.created == []


async def test_missing_bucket_without_auto_create_fails_as_bucket_missing() -> None:
    host = MemoryBuckets(RECIPIENTS_BUCKET, GROUP_INDEX_BUCKET)
    store = await open_store(host, NO_CREATE)
    host.delete(GROUP_INDEX_BUCKET)
    with pytest.raises(BucketMissing):
        await store.append_to_group("g", "e1")
    assert GROUP_INDEX_BUCKET not in host.buckets


async def test_missing_bucket_is_looked_for_at_most_once_per_interval() -> None:
    host = MemoryBuckets(GROUP_INDEX_BUCKET)
    kv = ReopeningBucket(
        host, GROUP_INDEX, NO_CREATE, host.buckets[GROUP_INDEX_BUCKET], retry_interval=60
    )
    host.delete(GROUP_INDEX_BUCKET)
    opens_before = host.opens
    for _ in range(20):
        with pytest.raises(BucketMissing):
            await kv.get("k")
    assert host.opens - opens_before == 1


async def test_missing_bucket_is_looked_for_again_after_the_interval(
    autojump_clock: trio.abc.Clock,
) -> None:
    host = MemoryBuckets(GROUP_INDEX_BUCKET)
    kv = ReopeningBucket(
        host, GROUP_INDEX, NO_CREATE, host.buckets[GROUP_INDEX_BUCKET], retry_interval=0.01
    )
    host.delete(GROUP_INDEX_BUCKET)
    with pytest.raises(BucketMissing):
        await kv.get("k")
    host.declare(GROUP_INDEX_BUCKET).put("k", b"v")
    with pytest.raises(BucketMissing):  # within the interval: not looked for yet
        await kv.get("k")
    await anyio.sleep(0.01)  # virtual time: the interval passes, exactly
    entry = await kv.get("k")
    assert entry is not None
    assert entry.value == b"v"


async def test_a_failing_store_is_not_taken_for_a_missing_bucket() -> None:
    host = MemoryBuckets(RECIPIENTS_BUCKET)
    kv = ReopeningBucket(host, RECIPIENTS, AUTO_CREATE, host.buckets[RECIPIENTS_BUCKET])
    host.buckets[RECIPIENTS_BUCKET].closed = True
    opens_before = host.opens
    with pytest.raises(StoreError) as raised:
        await kv.get("k")
    assert not isinstance(raised.value, BucketMissing)
    assert host.opens == opens_before
    assert host.created == []


async def test_unavailable_jetstream_while_reopening_stays_bucket_missing() -> None:
    host = MemoryBuckets(RECIPIENTS_BUCKET)
    kv = ReopeningBucket(host, RECIPIENTS, AUTO_CREATE, host.buckets[RECIPIENTS_BUCKET])
    host.delete(RECIPIENTS_BUCKET)
    host.jetstream_down = True
    with pytest.raises(BucketMissing):
        await kv.create("k", b"v")


async def test_bucket_deleted_again_after_its_recreation_is_recreated_again_at_once() -> None:
    host = MemoryBuckets(GROUP_INDEX_BUCKET)
    kv = ReopeningBucket(
        host, GROUP_INDEX, AUTO_CREATE, host.buckets[GROUP_INDEX_BUCKET], retry_interval=60
    )
    host.delete(GROUP_INDEX_BUCKET)
    await kv.create("a", b"1")
    host.delete(GROUP_INDEX_BUCKET)
    await kv.create("b", b"2")
    assert sorted(host.buckets[GROUP_INDEX_BUCKET].entries) == ["b"]
