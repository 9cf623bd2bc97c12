"""A read and the write it decides, in one call (emailrelay.store.kv.read_then_write):
on the JetStream adapter, where both go into the asyncio loop in one crossing,
against a real nats-server; and the plain get-then-write path on the in-memory KV."""

from __future__ import annotations

from collections.abc import Callable

import trio

from emailrelay.bridge.nats import JetStreamKeyValue
from emailrelay.store.buckets import GROUP_INDEX
from emailrelay.store.kv import (
    Entry,
    KeyValue,
    read_pair_then_write,
    read_then_write,
)
from emailrelay.store.tracking import TrackingStore
from tests.support.fakes import MemoryKeyValue
from tests.support.jetstream_kv import replicas_on_one_bucket
from tests.support.servers.nats import NatsServer


def append(suffix: bytes) -> Callable[[Entry | None], tuple[bytes | None, Entry | None]]:
    def derive(entry: Entry | None) -> tuple[bytes | None, Entry | None]:
        return (b"" if entry is None else entry.value) + suffix, entry

    return derive


def write_nothing(entry: Entry | None) -> tuple[bytes | None, str]:
    return None, "seen" if entry is not None else "absent"


async def test_read_then_write_creates_a_missing_key_on_nats_server(
    nats_server: NatsServer,
) -> None:
    async with replicas_on_one_bucket(nats_server.url, GROUP_INDEX, count=1) as (kv,):
        seen, revision = await read_then_write(kv, "k", append(b"a"))
        assert seen is None
        assert await kv.get("k") == Entry(b"a", revision or -1)


async def test_read_then_write_updates_at_the_revision_it_read_on_nats_server(
    nats_server: NatsServer,
) -> None:
    async with replicas_on_one_bucket(nats_server.url, GROUP_INDEX, count=1) as (kv,):
        first = await kv.create("k", b"a")
        seen, revision = await read_then_write(kv, "k", append(b"b"))
        assert seen == Entry(b"a", first)
        assert await kv.get("k") == Entry(b"ab", revision or -1)


async def test_read_then_write_writes_nothing_when_told_so_on_nats_server(
    nats_server: NatsServer,
) -> None:
    async with replicas_on_one_bucket(nats_server.url, GROUP_INDEX, count=1) as (kv,):
        assert await read_then_write(kv, "k", write_nothing) == ("absent", None)
        assert await kv.get("k") is None


async def test_jetstream_adapter_reads_and_writes_in_one_call(nats_server: NatsServer) -> None:
    async with replicas_on_one_bucket(nats_server.url, GROUP_INDEX, count=1) as (kv,):
        assert isinstance(kv, JetStreamKeyValue)
        calls: list[str] = []
        original_get = kv.get

        async def counting_get(key: str) -> Entry | None:
            calls.append(key)
            return await original_get(key)

        kv.get = counting_get  # type: ignore[method-assign]
        await read_then_write(kv, "k", append(b"a"))
        assert calls == []  # not the separate get + create path


async def test_two_replicas_appending_to_one_group_lose_nothing_on_nats_server(
    nats_server: NatsServer,
) -> None:
    async with replicas_on_one_bucket(nats_server.url, GROUP_INDEX) as (a, b):
        records = MemoryKeyValue()
        stores = [TrackingStore(records, kv, conflict_backoff_initial=0.001) for kv in (a, b)]
        expected = [f"id-{n}" for n in range(120)]
        async with trio.open_nursery() as nursery:
            for n, email_id in enumerate(expected):
                nursery.start_soon(stores[n % 2].append_to_group, "g", email_id)
        found = await stores[0].group_ids("g")
    assert found is not None
    assert sorted(found) == sorted(expected)


async def test_read_then_write_on_a_plain_key_value_gets_then_writes() -> None:
    kv: KeyValue = MemoryKeyValue()
    await read_then_write(kv, "k", append(b"a"))
    await read_then_write(kv, "k", append(b"b"))
    entry = await kv.get("k")
    assert entry is not None
    assert entry.value == b"ab"


def beside(entry: Entry | None, other: Entry | None) -> tuple[bytes | None, Entry | None]:
    """Appends the other key's value: what the write decided from both reads."""
    return (b"" if entry is None else entry.value) + (b"-" if other is None else other.value), other


async def test_read_pair_then_write_sees_the_other_key_on_nats_server(
    nats_server: NatsServer,
) -> None:
    async with replicas_on_one_bucket(nats_server.url, GROUP_INDEX, count=1) as (kv,):
        await kv.create("other", b"o")
        await kv.create("k", b"a")
        seen, revision = await read_pair_then_write(kv, "k", "other", beside)
        assert seen is not None
        assert seen.value == b"o"
        assert await kv.get("k") == Entry(b"ao", revision or -1)
        assert (await kv.get("other") or Entry(b"", 0)).value == b"o"


async def test_read_pair_then_write_on_the_memory_kv_reads_both() -> None:
    kv = MemoryKeyValue()
    kv.put("other", b"o")
    await read_pair_then_write(kv, "k", "other", beside)
    assert kv.entries["k"].value == b"o"
