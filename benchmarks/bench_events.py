"""SES events applied per second: poller concurrency 1 vs the default, same run.

Starts its own nats-server (JetStream) and moto's SQS server (a separate
process, so it does not share our GIL) on loopback. For each run: 500 fresh
tracking records, a queue pre-filled with 5,000 mixed SNS-wrapped events for
them (opens, clicks, deliveries, bounces, delays, sends, a few poison
messages), then the real poller, SQS client and JetStream tracking store drain
it. Prints events/s for both runs, their ratio, and where the time of the
concurrency-1 run went (SQS calls, KV calls, our own parsing and applying).

    python benchmarks/bench_events.py [--events 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import anyio  # noqa: E402
import boto3  # type: ignore[import-untyped]  # noqa: E402
import trio  # noqa: E402
import trio_asyncio  # noqa: E402

from emailrelay.api import TrackingRecord  # noqa: E402
from emailrelay.app import open_tracking_store  # noqa: E402
from emailrelay.bridge.nats import NatsConnection  # noqa: E402
from emailrelay.config import Settings  # noqa: E402
from emailrelay.engagement.events import EngagementEvent, apply_event, parse_message  # noqa: E402
from emailrelay.engagement.poller import (  # noqa: E402
    DEFAULT_CONCURRENCY,
    PollerSettings,
    poll_engagement_events,
)
from emailrelay.sqs import SqsClient, SqsMessage  # noqa: E402
from emailrelay.store.tracking import TrackingStore  # noqa: E402
from tests.support.servers.nats import NatsServer  # noqa: E402
from tests.support.servers.sqs import ACCESS_KEY_ID, SECRET_ACCESS_KEY  # noqa: E402
from tests.support.waiting import LOOPBACK, free_port, wait_for_port  # noqa: E402

REGION = "us-east-1"
EXAMPLES = json.loads(
    (REPO_ROOT.parent / "shared" / "data" / "ses-event-examples.json").read_text()
)
MIX = ["Open"] * 10 + ["Click"] * 4 + ["Delivery"] * 2 + ["Send", "Bounce", "DeliveryDelay"]
RECORDS = 500


class Timed:
    """Wall time spent inside awaited calls, by category (meaningful at concurrency 1)."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    def wrap(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1

        return timed


class CountingQueue:
    """The SQS client, timed, signalling when ``total`` messages were deleted."""

    def __init__(self, sqs: SqsClient | MemoryQueue, total: int, timed: Timed) -> None:
        self._receive = timed.wrap("sqs receive", sqs.receive_messages)
        self._delete = timed.wrap("sqs delete", sqs.delete_messages)
        self.total = total
        self.deleted = 0
        self.all_deleted = anyio.Event()
        self.timed = timed

    async def receive_messages(
        self, max_messages: int = 10, wait_seconds: int = 20
    ) -> list[SqsMessage]:
        result: list[SqsMessage] = await self._receive(max_messages, wait_seconds)
        return result

    async def delete_messages(self, messages: Iterable[SqsMessage]) -> list[str]:
        batch = list(messages)
        failed: list[str] = await self._delete(batch)
        self.deleted += len(batch) - len(failed)
        if self.deleted >= self.total:
            self.all_deleted.set()
        return failed


class TimedStore:
    """The tracking store, with the KV calls underneath timed."""

    def __init__(self, store: TrackingStore, timed: Timed) -> None:
        records = store._records
        records.get = timed.wrap("kv get", records.get)  # type: ignore[method-assign]
        records.update = timed.wrap("kv update", records.update)  # type: ignore[method-assign]
        self._store = store

    async def update_record(
        self, email_id: str, change: Callable[[TrackingRecord], bool]
    ) -> TrackingRecord | None:
        return await self._store.update_record(email_id, change)


class MemoryQueue:
    """A pre-filled in-memory queue with the SQS client's two calls: isolates our
    code and the KV store from moto, whose every call scans the whole queue."""

    def __init__(self, bodies: list[str]) -> None:
        self._messages = [
            SqsMessage(message_id=f"m{n}", receipt_handle=f"h{n}", body=b, receive_count=1)
            for n, b in enumerate(bodies)
        ]

    async def receive_messages(
        self, max_messages: int = 10, wait_seconds: int = 20
    ) -> list[SqsMessage]:
        await anyio.lowlevel.checkpoint()
        batch, self._messages = self._messages[:max_messages], self._messages[max_messages:]
        if not batch:
            await anyio.sleep(wait_seconds)
        return batch

    async def delete_messages(self, messages: Iterable[SqsMessage]) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return []


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", LOOPBACK, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(LOOPBACK, port, timeout=30)
    return moto, f"http://{LOOPBACK}:{port}"


def event_bodies(email_ids: list[str], count: int) -> list[str]:
    bodies = []
    for n in range(count):
        if n % 250 == 249:
            bodies.append("poison: not JSON")
            continue
        example = MIX[n % len(MIX)]
        event = json.loads(json.dumps(EXAMPLES[example]))
        email_id = email_ids[n % len(email_ids)]
        event["mail"].setdefault("headers", []).append(
            {"name": "X-LFX-TRACKING-ID", "value": f"bench/{email_id}"}
        )
        envelope = dict(EXAMPLES["_sns_envelope_example"])
        envelope["MessageId"] = str(uuid.uuid4())
        envelope["Message"] = json.dumps(event)
        bodies.append(json.dumps(envelope))
    return bodies


def fill_queue(boto: Any, queue_url: str, bodies: list[str]) -> None:
    for start in range(0, len(bodies), 10):
        entries = [
            {"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[start : start + 10])
        ]
        boto.send_message_batch(QueueUrl=queue_url, Entries=entries)


async def create_records(store: TrackingStore, count: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    async with anyio.create_task_group() as tg:
        for email_id in ids:
            record = TrackingRecord(
                group_id="bench",
                email_id=email_id,
                to="someone@example.com",
                subject="bench",
                sent_at=datetime.now(UTC),
            )
            tg.start_soon(store.create_record, record)
    return ids


async def drain(
    nats_url: str, boto: Any, endpoint: str | None, events: int, concurrency: int
) -> tuple[float, Timed]:
    """Seconds the poller took to apply (and delete) every pre-filled event."""
    async with trio_asyncio.open_loop():
        nats = await NatsConnection.connect((nats_url,), None, give_up_after=10)
        try:
            store = await open_tracking_store(nats, Settings())
            assert store is not None
            email_ids = await create_records(store, RECORDS)
            bodies = event_bodies(email_ids, events)
            timed = Timed()
            settings = PollerSettings(concurrency=concurrency, wait_seconds=1)
            tracked = TimedStore(store, timed)
            if endpoint is None:
                return await run_poller(CountingQueue(MemoryQueue(bodies), events, timed), tracked,
                                        settings)  # fmt: skip
            queue_url = boto.create_queue(
                QueueName=f"bench-{uuid.uuid4().hex[:8]}", Attributes={"VisibilityTimeout": "120"}
            )["QueueUrl"]
            await anyio.to_thread.run_sync(fill_queue, boto, queue_url, bodies)
            sqs = SqsClient(
                queue_url, region=REGION, endpoint_url=endpoint, credentials=_StaticCredentials()
            )
            async with sqs:
                return await run_poller(CountingQueue(sqs, events, timed), tracked, settings)
        finally:
            await nats.drain()


async def run_poller(
    queue: CountingQueue, store: TimedStore, settings: PollerSettings
) -> tuple[float, Timed]:
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(poll_engagement_events, queue, store, settings)
        with anyio.fail_after(150):
            await queue.all_deleted.wait()
        tg.cancel_scope.cancel()
    return time.perf_counter() - started, queue.timed


class _StaticCredentials:
    def get_frozen_credentials(self) -> Any:
        from botocore.credentials import ReadOnlyCredentials  # type: ignore[import-untyped]

        return ReadOnlyCredentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY, None)


def own_code_seconds(events: int) -> float:
    """CPU time of parsing and applying ``events`` bodies, with no I/O at all."""
    email_ids = [str(uuid.uuid4()) for _ in range(RECORDS)]
    bodies = event_bodies(email_ids, events)
    records = {
        i: TrackingRecord(
            group_id="b", email_id=i, to="a@example.com", subject="s", sent_at=datetime.now(UTC)
        )
        for i in email_ids
    }
    now = datetime.now(UTC)
    started = time.perf_counter()
    for n, body in enumerate(bodies):
        event = parse_message(body, f"m{n}")
        if isinstance(event, EngagementEvent):
            record = TrackingRecord.model_validate_json(records[event.email_id].to_json())
            apply_event(record, event, now)
            records[event.email_id] = record
            record.to_json()
    return time.perf_counter() - started


def report(title: str, events: int, results: dict[int, tuple[float, Timed]]) -> None:
    print(title)
    for concurrency, (seconds, _) in results.items():
        label = "baseline" if concurrency == 1 else "default"
        print(
            f"  concurrency {concurrency:>3} ({label}): {events / seconds:8.0f} events/s"
            f"  ({seconds:.2f} s)"
        )
    ratio = results[1][0] / results[DEFAULT_CONCURRENCY][0]
    print(f"  ratio default / baseline: {ratio:.2f}x")
    seconds, timed = results[1]
    print("  time inside each kind of call at concurrency 1 (receive overlaps handling):")
    for name in ("sqs receive", "sqs delete", "kv get", "kv update"):
        calls = timed.calls[name]
        if not calls:
            continue
        spent = timed.seconds[name]
        print(
            f"    {name:<12} {spent:6.2f} s  {100 * spent / seconds:5.1f}% of the run"
            f"  {calls:6d} calls  {1000 * spent / calls:7.2f} ms/call"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5000, help="events from the memory queue")
    parser.add_argument("--moto-events", type=int, default=500, help="events pre-filled in moto")
    args = parser.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

    moto, endpoint = start_moto()
    try:
        with NatsServer() as nats_server:
            boto = boto3.client(
                "sqs",
                region_name=REGION,
                endpoint_url=endpoint,
                aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY,
            )
            memory = {
                c: trio.run(drain, nats_server.url, boto, None, args.events, c)
                for c in (1, DEFAULT_CONCURRENCY)
            }
            with_moto = {
                c: trio.run(drain, nats_server.url, boto, endpoint, args.moto_events, c)
                for c in (1, DEFAULT_CONCURRENCY)
            }
            boto.close()
    finally:
        moto.terminate()
        moto.wait(10)

    report(
        f"SES events applied: {args.moto_events} pre-filled in moto's SQS server, JetStream KV",
        args.moto_events,
        with_moto,
    )
    report(
        f"SES events applied: {args.events} pre-filled in an in-memory queue, JetStream KV",
        args.events,
        memory,
    )
    own = own_code_seconds(args.events)
    print(
        f"Our own code (parse + decode/apply/encode the record, no I/O): "
        f"{args.events / own:.0f} events/s on one core"
    )


if __name__ == "__main__":
    main()
