"""Suppression list paging over a real nats-server (``nox -s bench``).

10,000 entries (every 97th a removal tombstone) in an ``email-suppressions``
bucket. Prints, for the old way (list every key, then read entries from the
first until ``offset + limit`` were found, for every page) and for
:meth:`SuppressionStore.page` (follow the bucket's writes, read the page):

- one page of 100 at offset 9,000 (the new way: the process's first page,
  which reads the list once, and a later one);
- 20 concurrent pages of 100 at offsets 7,100 to 9,000;
- a page after another replica added one address.

Both ways run in the same process against the same bucket. Then the same
pages through a relay subprocess (``suppression.list`` over NATS, default
settings), as callers see them. Figures only:
nothing here asserts timing (tests/test_suppression_paging.py asserts what
the pages hold).
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
import trio
import trio_asyncio

from emailrelay import api
from emailrelay.bridge.nats import NatsConnection
from emailrelay.store.buckets import SUPPRESSIONS
from emailrelay.store.kv import MAX_BATCH_KEYS, ListableKeyValue, StoreError
from emailrelay.store.suppressions import (
    Suppression,
    SuppressionReason,
    SuppressionStore,
    _decode,
    suppression_key,
)
from tests.support.jetstream_kv import replicas_on_one_bucket
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess
from tests.support.waiting import wait_until

asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
logging.getLogger("emailrelay").setLevel(logging.ERROR)

ENTRIES = 10_000
TOMBSTONE = json.dumps({"removed_at": "2024-05-02T00:00:00Z"}).encode()
NOW = datetime(2024, 5, 1, tzinfo=UTC)


async def old_page(kv: ListableKeyValue, limit: int, offset: int) -> builtins.list[Suppression]:
    """The list before this change: every key, then entries from the first."""
    keys = sorted(await kv.keys())
    found: builtins.list[Suppression] = []
    for start in range(0, len(keys), MAX_BATCH_KEYS):
        batch = keys[start : start + MAX_BATCH_KEYS]
        entries = await kv.get_many(batch)
        for key in batch:
            entry = entries.get(key)
            suppression = None if entry is None else _decode(entry)
            if suppression is not None:
                found.append(suppression)
        if len(found) >= offset + limit:
            break
    return found[offset : offset + limit]


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def twenty_pages(page: Callable[[int, int], Awaitable[object]]) -> tuple[float, int]:
    """Seconds for 20 concurrent pages, and how many failed (the store timed out)."""
    failed = 0

    async def one(offset: int) -> None:
        nonlocal failed
        try:
            await page(100, offset)
        except StoreError:
            failed += 1

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(one, 9000 - 100 * n)
    return time.perf_counter() - start, failed


async def fill(kv: ListableKeyValue) -> None:
    limiter = anyio.CapacityLimiter(64)

    async def put(n: int) -> None:
        address = f"user{n:05d}@example.org"
        value = (
            TOMBSTONE
            if n % 97 == 0
            else Suppression(address, SuppressionReason.BOUNCE, NOW).to_json()
        )
        async with limiter:
            await kv.create(suppression_key(address), value)

    async with anyio.create_task_group() as tg:
        for n in range(ENTRIES):
            tg.start_soon(put, n)


async def main(url: str) -> None:
    async with replicas_on_one_bucket(url, SUPPRESSIONS, count=2) as (kv, other):
        await fill(kv)
        store = SuppressionStore(kv)

        async def old(limit: int, offset: int) -> object:
            return await old_page(kv, limit, offset)

        async def new(limit: int, offset: int) -> object:
            return await store.page(limit, offset)

        old_one = statistics.median([await timed(lambda: old(100, 9000)) for _ in range(3)])
        old_twenty, old_failed = await twenty_pages(old)
        first = await timed(lambda: new(100, 9000))
        new_one = statistics.median([await timed(lambda: new(100, 9000)) for _ in range(3)])
        new_twenty, new_failed = await twenty_pages(new)
        await SuppressionStore(other).add(
            Suppression("late@example.org", SuppressionReason.MANUAL, NOW)
        )
        after_add = await timed(lambda: new(100, 9000))
    print(f"suppression.list over {ENTRIES:,} entries (real nats-server, one process)")
    print(f"{'':38} {'old way':>10} {'this way':>10}")
    print(f"{'one page of 100 at offset 9,000':38} {old_one:>9.3f}s {new_one:>9.3f}s")
    print(f"{'20 concurrent pages of 100':38} {old_twenty:>9.3f}s {new_twenty:>9.3f}s")
    print(f"{'  of which failed (store timeout)':38} {old_failed:>10} {new_failed:>10}")
    print(f"{'first page of a fresh process':38} {'':>10} {first:>9.3f}s")
    print(f"{'a page after another replica added one':38} {'':>10} {after_add:>9.3f}s")


async def fill_relay_bucket(url: str) -> None:
    async with trio_asyncio.open_loop():
        nats = await NatsConnection.connect([url], None, give_up_after=10)
        try:
            kv = await nats.key_value(api.SUPPRESSIONS_BUCKET)
            assert kv is not None, "the relay creates the bucket"
            await fill(kv)
        finally:
            await nats.drain()


def through_the_relay(server: NatsServer) -> None:
    env = {
        "NATS_URL": server.url,
        "EMAIL_ENABLED": "false",
        "SUPPRESSION_ENABLED": "true",
        "LOG_LEVEL": "warning",
    }
    with RelayProcess(env) as relay, SyncNats(server.url) as caller:
        relay.wait_ready()
        wait_until(
            lambda: "suppressions" in caller.request_json(api.SUPPRESSION_LIST_SUBJECT, {}),
            message="suppression.list not served",
        )
        trio.run(fill_relay_bucket, server.url)
        page = {"limit": 100, "offset": 9000}
        start = time.perf_counter()
        caller.request_json(api.SUPPRESSION_LIST_SUBJECT, page, timeout=30)
        first = time.perf_counter() - start
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            caller.request_json(api.SUPPRESSION_LIST_SUBJECT, page, timeout=30)
            runs.append(time.perf_counter() - start)
        pages = [{"limit": 100, "offset": 9000 - 100 * n} for n in range(20)]
        start = time.perf_counter()
        replies = caller.request_many(api.SUPPRESSION_LIST_SUBJECT, pages, 20, timeout=30)
        twenty = time.perf_counter() - start
    errors = [r["error"] for r in replies if "error" in r]
    print("through a relay (NATS request/reply, MAX_READS_IN_FLIGHT default)")
    print(f"{'first page at offset 9,000':38} {first:>9.3f}s")
    print(f"{'a later page at offset 9,000':38} {statistics.median(runs):>9.3f}s")
    print(f"{'20 concurrent pages of 100':38} {twenty:>9.3f}s  errors: {errors or 'none'}")


if __name__ == "__main__":
    with NatsServer() as server:
        trio.run(main, server.url)
    with NatsServer() as server:
        through_the_relay(server)
