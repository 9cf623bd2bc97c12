"""Tracking queries and hot-group sends over a real nats-server (``nox -s bench``).

Prints, for groups of 1,000, 10,000 and 50,000 emails:

- analytics latency through GetEngagementAnalyticsHandler over the store
  (batched, concurrent reads) against the sequential one-get-at-a-time approach;
- paged status latency (pages of 1,000 through GetEmailStatusHandler) against
  the same page read one get at a time;

and send throughput through SendEmailHandler (no-op sender, real store) to one
hot group against the same number of sends spread over distinct groups.
Figures only: nothing here asserts timing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
import trio
import trio_asyncio

from emailrelay import api
from emailrelay.addresses import parse_mailbox
from emailrelay.bridge.nats import JetStreamKeyValue, NatsConnection
from emailrelay.deadline import Deadline
from emailrelay.handlers.analytics import GetEngagementAnalyticsHandler
from emailrelay.handlers.replies import encode_reply
from emailrelay.handlers.send import SendEmailHandler, SendRules
from emailrelay.handlers.status import GetEmailStatusHandler
from emailrelay.store.tracking import TrackingStore
from tests.support.servers.nats import NatsServer

asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
logging.getLogger("emailrelay").setLevel(logging.ERROR)  # the disconnect at the end is expected

SIZES = (1_000, 10_000, 50_000)
SENDS = 3_000
SEND_CONCURRENCY = 64


async def timed(fn: Callable[[], Awaitable[object]], repeat: int = 3) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


async def populate(store: TrackingStore, group: str, size: int) -> None:
    limiter = anyio.CapacityLimiter(64)

    async def write(n: int) -> None:
        email_id = str(uuid.uuid4())
        record = api.TrackingRecord(
            group_id=group,
            email_id=email_id,
            to=f"user{n}@example.org",
            subject="invitation to the summit",
            sent_at=datetime.now(UTC),
            delivered=n % 2 == 0,
            opened=n % 5 == 0,
            open_count=1 if n % 5 == 0 else 0,
        )
        async with limiter:
            await store.create_record(record)
            await store.append_to_group(group, email_id)

    async with anyio.create_task_group() as tg:
        for n in range(size):
            tg.start_soon(write, n)


async def sequential_analytics(store: TrackingStore, records: JetStreamKeyValue, group: str) -> int:
    """The replaced relay's way: the index, then one get per record, in turn."""
    delivered = 0
    for email_id in await store.group_ids(group) or []:
        entry = await records.get(email_id)
        if entry is not None:
            delivered += api.TrackingRecord.model_validate_json(entry.value).delivered
    return delivered


async def sequential_page(store: TrackingStore, records: JetStreamKeyValue, group: str) -> bytes:
    parts = []
    for email_id in await store.group_ids_slice(group, 0, 1000) or []:
        entry = await records.get(email_id)
        if entry is not None:
            parts.append(api.TrackingRecord.model_validate_json(entry.value).to_json())
    return b"[" + b",".join(parts) + b"]"


class NoopSender:
    async def send(
        self, sender: str, recipient: str, message: bytes, deadline: Deadline
    ) -> str | None:
        await anyio.lowlevel.checkpoint()
        return None


async def send_rate(store: TrackingStore, group_for: Callable[[int], str]) -> float:
    default_from = parse_mailbox("noreply@lfx.linuxfoundation.org")
    assert default_from is not None
    rules = SendRules(
        email_enabled=True,
        default_from=default_from,
        default_from_display_name="LFX",
        allowed_from_domains=("lfx.linuxfoundation.org",),
        allowed_reply_to_domains=(),
        allowed_recipient_domains=(),
    )
    handler = SendEmailHandler(rules, NoopSender(), store)
    limiter = anyio.CapacityLimiter(SEND_CONCURRENCY)

    async def one(n: int) -> None:
        request = {"to": f"u{n}@example.org", "subject": "s", "html": "h", "text": "t"}
        request["group_id"] = group_for(n)
        async with limiter:
            reply = json.loads(encode_reply(await handler(json.dumps(request).encode())))
        assert reply.get("email_id"), reply

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(SENDS):
            tg.start_soon(one, n)
    return SENDS / (time.perf_counter() - start)


async def main(url: str) -> None:
    async with trio_asyncio.open_loop():
        nats = await NatsConnection.connect([url], None, give_up_after=10)
        records = await nats.create_key_value(api.RECIPIENTS_BUCKET, 64 * 1024, 1)
        groups = await nats.create_key_value(api.GROUP_INDEX_BUCKET, 1024 * 1024, 1)
        recipients = await nats.create_key_value(api.RECIPIENT_INDEX_BUCKET, 1024 * 1024, 1)
        # As the relay writes: the record, its recipient's index, the group's index.
        store = TrackingStore(records, groups, recipients=recipients)
        analytics = GetEngagementAnalyticsHandler(store)
        status = GetEmailStatusHandler(store, lambda: nats.max_payload)

        print("group size | analytics  sequential  ratio | page of 1000  sequential  ratio")
        for size in SIZES:
            group = f"bench-{size}-{uuid.uuid4()}"
            await populate(store, group, size)
            request = json.dumps({"group_id": group}).encode()
            fast = await timed(lambda: analytics(request))  # noqa: B023
            slow = await timed(lambda: sequential_analytics(store, records, group), 1)  # noqa: B023
            last = json.dumps({"group_id": group, "limit": 1000, "offset": size - 1000}).encode()
            page = await timed(lambda: status(last))  # noqa: B023
            slow_page = await timed(lambda: sequential_page(store, records, group), 1)  # noqa: B023
            print(
                f"{size:>10} | {fast:8.3f}s  {slow:9.3f}s  {slow / fast:4.1f}x"
                f" | {page:11.3f}s  {slow_page:9.3f}s  {slow_page / page:4.1f}x",
                flush=True,
            )

        hot_group = f"hot-{uuid.uuid4()}"
        spread = await send_rate(store, lambda n: f"spread-{n}-{hot_group}")
        hot = await send_rate(store, lambda n: hot_group)
        hot_size = len(await store.group_ids(hot_group) or [])
        print(
            f"sends ({SENDS} at concurrency {SEND_CONCURRENCY}, no-op SMTP): "
            f"spread over distinct groups {spread:.0f}/s, one hot group {hot:.0f}/s "
            f"({hot / spread:.0%} of spread; hot index holds {hot_size} ids)"
        )
        await nats.drain()


if __name__ == "__main__":
    with NatsServer() as server:
        trio.run(main, server.url)
