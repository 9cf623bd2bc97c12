"""Pending tracking writes (sent emails whose record could not be stored in
their request's time), over the tracking store on in-memory buckets that fail
and recover. End to end against a nats-server that is stopped and restarted:
test_tracking_recovery.py."""

from __future__ import annotations

import inspect
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import pytest
import trio.testing
from prometheus_client import REGISTRY

from emailrelay.api import GROUP_INDEX_BUCKET, RECIPIENTS_BUCKET, TrackingRecord
from emailrelay.store.buckets import BucketPolicy, open_tracking_store
from emailrelay.store.kv import StoreError
from emailrelay.store.pending import MAX_BYTES, MAX_WRITES, PendingTrackingWrites
from emailrelay.store.tracking import TrackingStore
from tests.support.fakes import MemoryBuckets, MemoryKeyValue
from tests.support.waiting import wait_for


def record(group_id: str = "g", subject: str = "hello") -> TrackingRecord:
    return TrackingRecord(
        group_id=group_id,
        email_id=str(uuid.uuid4()),
        to="jane.doe@example.org",
        subject=subject,
        sent_at=datetime(2024, 5, 1, tzinfo=UTC),
    )


@dataclass
class Store:
    tracking: TrackingStore
    records: MemoryKeyValue
    groups: MemoryKeyValue

    def down(self) -> None:
        self.records.closed = self.groups.closed = True

    def up(self) -> None:
        self.records.closed = self.groups.closed = False

    def index(self, group_id: str) -> list[str]:
        ids: list[str] = json.loads(self.groups.entries[group_id].value)
        return ids


def new_store() -> Store:
    records, groups = MemoryKeyValue(), MemoryKeyValue()
    return Store(TrackingStore(records, groups), records, groups)


def dropped() -> float:
    return REGISTRY.get_sample_value("emailrelay_tracking_pending_dropped_total") or 0.0


def pending_gauge() -> float:
    return REGISTRY.get_sample_value("emailrelay_tracking_pending") or 0.0


def quick_queue(**bounds: int) -> PendingTrackingWrites:
    return PendingTrackingWrites(backoff_initial=0.001, backoff_max=0.01, **bounds)


@asynccontextmanager
async def writing(pending: PendingTrackingWrites) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(pending.write_when_possible)
        yield
        tg.cancel_scope.cancel()


async def until_empty(pending: PendingTrackingWrites) -> None:
    """Poll (the queue has no event for it): fail after a deadline."""
    with anyio.fail_after(5):
        while True:
            if not len(pending):
                return
            await anyio.sleep(0.001)


@dataclass
class CountingWriter:
    """Fails while ``down``; counts every attempt."""

    down: bool = True
    attempts: int = 0
    stored: list[str] = field(default_factory=list)

    async def create_record(self, record: TrackingRecord) -> None:
        await anyio.lowlevel.checkpoint()
        self.attempts += 1
        if self.down:
            raise StoreError("down")
        self.stored.append(record.email_id)

    async def append_to_group(self, group_id: str, email_id: str) -> None:
        await anyio.lowlevel.checkpoint()


async def test_pending_write_lands_once_the_store_recovers() -> None:
    store, pending, sent = new_store(), quick_queue(), record()
    store.down()
    assert pending.add(sent, store.tracking)
    async with writing(pending):
        await wait_for(lambda: store.records.failures, message="no write was tried")
        assert len(pending) == 1
        store.up()
        await until_empty(pending)
    assert await store.tracking.get_record(sent.email_id) == sent
    assert store.index("g") == [sent.email_id]


async def test_every_pending_write_lands_after_recovery() -> None:
    store, pending = new_store(), quick_queue()
    store.down()
    sent = [record(group_id=f"g{n % 3}") for n in range(60)]
    for r in sent:
        pending.add(r, store.tracking)
    async with writing(pending):
        store.up()
        await until_empty(pending)
    assert sorted(store.records.entries) == sorted(r.email_id for r in sent)
    for n in range(3):
        assert sorted(store.index(f"g{n}")) == sorted(r.email_id for r in sent[n::3])


async def test_stored_record_is_only_indexed() -> None:
    store, pending, sent = new_store(), quick_queue(), record()
    await store.tracking.create_record(sent)
    writes_before = store.records.writes
    pending.add(sent, store.tracking, record_stored=True)
    async with writing(pending):
        await until_empty(pending)
    assert store.records.writes == writes_before
    assert store.index("g") == [sent.email_id]


async def test_retried_create_that_conflicts_counts_as_landed() -> None:
    store, pending, sent = new_store(), quick_queue(), record()
    await store.tracking.create_record(sent)  # an attempt whose reply was lost
    pending.add(sent, store.tracking, record_stored=False)
    async with writing(pending):
        await until_empty(pending)
    assert await store.tracking.get_record(sent.email_id) == sent
    assert store.index("g") == [sent.email_id]


async def test_index_entry_already_there_is_not_added_twice() -> None:
    store, pending, sent = new_store(), quick_queue(), record()
    await store.tracking.create_record(sent)
    await store.tracking.append_to_group("g", sent.email_id)
    pending.add(sent, store.tracking, record_stored=True)
    async with writing(pending):
        await until_empty(pending)
    assert store.index("g") == [sent.email_id]


async def test_writes_wait_for_a_missing_bucket_an_operator_declares_again() -> None:
    host = MemoryBuckets(RECIPIENTS_BUCKET, GROUP_INDEX_BUCKET)
    tracking = await open_tracking_store(host, BucketPolicy(auto_create=False))
    assert tracking is not None
    gone = host.delete(GROUP_INDEX_BUCKET)
    pending, sent = quick_queue(), record()
    pending.add(sent, tracking)
    async with writing(pending):
        await wait_for(lambda: gone.failures, message="no index write was tried")
        assert len(pending) == 1
        host.declare(GROUP_INDEX_BUCKET)
        await until_empty(pending)
    assert json.loads(host.buckets[GROUP_INDEX_BUCKET].entries["g"].value) == [sent.email_id]


async def test_while_the_store_is_down_each_pass_tries_one_write() -> None:
    pending, writer = PendingTrackingWrites(backoff_initial=10, backoff_max=10), CountingWriter()
    for _ in range(100):
        pending.add(record(), writer)
    async with writing(pending):
        await wait_for(lambda: writer.attempts, message="no write was tried")
        # Every task blocked: the writer is in its 10 s backoff, not trying more.
        await trio.testing.wait_all_tasks_blocked()
    assert writer.attempts == 1


async def test_writes_are_tried_oldest_first() -> None:
    pending, writer = quick_queue(), CountingWriter(down=False)
    sent = [record() for _ in range(5)]
    for r in sent:
        pending.add(r, writer)
    async with writing(pending):
        await until_empty(pending)
    assert writer.stored[0] == sent[0].email_id


async def test_full_queue_drops_the_write() -> None:
    pending, writer = quick_queue(max_writes=2), CountingWriter()
    assert pending.add(record(), writer)
    assert pending.add(record(), writer)
    assert not pending.add(record(), writer)
    assert len(pending) == 2


async def test_dropped_write_is_counted() -> None:
    pending, writer = quick_queue(max_writes=1), CountingWriter()
    pending.add(record(), writer)
    before = dropped()
    pending.add(record(), writer)
    assert dropped() == before + 1


async def test_queue_is_bounded_in_bytes_too() -> None:
    small = len(record().to_json())
    pending, writer = quick_queue(max_bytes=small * 3), CountingWriter()
    assert not pending.add(record(subject="x" * small * 3), writer)
    assert pending.add(record(), writer)


def test_the_contracts_bounds_are_the_defaults() -> None:
    """docs/contract.md: 10,000 writes or 64 MiB of records."""
    assert (MAX_WRITES, MAX_BYTES) == (10_000, 64 * 1024 * 1024)
    defaults = inspect.signature(PendingTrackingWrites).parameters
    assert defaults["max_writes"].default == MAX_WRITES
    assert defaults["max_bytes"].default == MAX_BYTES


async def test_a_default_queue_takes_10000_writes_and_drops_the_next() -> None:
    pending, writer = PendingTrackingWrites(), CountingWriter()
    taken = [pending.add(record(), writer) for _ in range(MAX_WRITES)]
    assert all(taken)
    assert not pending.add(record(), writer)
    assert len(pending) == MAX_WRITES


async def test_a_default_queue_holds_at_most_64_mib_of_records() -> None:
    pending, writer = PendingTrackingWrites(), CountingWriter()
    big = len(record(subject="s" * 60_000).to_json())
    taken = 0
    while pending.add(record(subject="s" * 60_000), writer):
        taken += 1
    assert taken == MAX_BYTES // big  # far below 10,000: the byte bound held
    assert pending.add(record(), writer)  # a small one still fits


async def test_gauge_counts_pending_writes() -> None:
    store, pending = new_store(), quick_queue()
    store.down()
    before = pending_gauge()
    pending.add(record(), store.tracking)
    pending.add(record(), store.tracking)
    assert pending_gauge() == before + 2
    async with writing(pending):
        store.up()
        await until_empty(pending)
    assert pending_gauge() == before


async def test_last_try_stores_what_the_store_takes() -> None:
    store, pending, sent = new_store(), quick_queue(), record()
    pending.add(sent, store.tracking)
    assert await pending.last_try(within=5) == []
    assert store.index("g") == [sent.email_id]


async def test_last_try_gives_up_within_its_time() -> None:
    pending, writer = quick_queue(), CountingWriter()
    sent = record()
    pending.add(sent, writer)
    with anyio.fail_after(5):
        left = await pending.last_try(within=0.05)
    assert left == [sent.email_id]


async def test_last_try_logs_the_ids_left_and_no_address(caplog: pytest.LogCaptureFixture) -> None:
    pending, writer = quick_queue(), CountingWriter()
    sent = [record() for _ in range(3)]
    for r in sent:
        pending.add(r, writer)
    with caplog.at_level(logging.ERROR, logger="emailrelay.store.pending"):
        await pending.last_try(within=0.02)
    [line] = caplog.records
    assert line.email_ids == [r.email_id for r in sent]  # type: ignore[attr-defined]
    assert "jane.doe" not in str(line.__dict__)


@dataclass
class OutageMidway:
    """The store's writer, which brings the store down again once ``after``
    records landed: a second outage while the queue drains."""

    store: Store
    after: int
    landed: int = 0

    async def create_record(self, record: TrackingRecord) -> None:
        await self.store.tracking.create_record(record)
        self.landed += 1
        if self.landed == self.after:
            self.store.down()

    async def append_to_group(self, group_id: str, email_id: str) -> None:
        await self.store.tracking.append_to_group(group_id, email_id)


async def test_second_outage_while_draining_loses_nothing_and_indexes_each_once() -> None:
    store, pending = new_store(), quick_queue()
    writer = OutageMidway(store, after=10)
    sent = [record() for _ in range(40)]
    store.down()
    for r in sent:
        pending.add(r, writer)
    async with writing(pending):
        store.up()
        with anyio.fail_after(5):
            while True:
                if writer.landed >= 10:
                    break
                await anyio.sleep(0.001)
        assert 0 < len(pending) < 40  # the drain was cut short
        store.up()
        await until_empty(pending)
    assert sorted(store.records.entries) == sorted(r.email_id for r in sent)
    assert sorted(store.index("g")) == sorted(r.email_id for r in sent)
