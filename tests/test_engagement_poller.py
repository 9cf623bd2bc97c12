"""The poller's rules against in-memory fakes: backoff schedule, abort, outcomes, deletes.

The same behaviours run end to end (relay + nats-server + moto) in test_engagement_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import pytest
import trio

from emailrelay.api import TrackingRecord
from emailrelay.engagement.handler import EventHandler, RecordUpdater
from emailrelay.engagement.poller import PollerAborted, PollerSettings, poll_engagement_events
from emailrelay.sqs import SqsError, SqsMessage
from emailrelay.store.kv import StoreError
from emailrelay.supervision import Backoff as ReceiveBackoff
from tests.support.fakes import FakeStore, message
from tests.support.ses_events import EMAIL_ID, ses_event, sns_body
from tests.support.waiting import wait_for


class FakeQueue:
    """Hands out scripted receive results; records deletes."""

    def __init__(self, script: list[list[SqsMessage] | Exception]) -> None:
        self.script = script
        self.receives = 0
        self.deleted: list[str] = []
        self.delete_calls: list[int] = []

    async def receive_messages(
        self, max_messages: int = 10, wait_seconds: int = 20
    ) -> list[SqsMessage]:
        self.receives += 1
        if not self.script:
            await trio.sleep_forever()
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    async def delete_messages(self, messages: Iterable[SqsMessage]) -> list[str]:
        ids = [m.message_id for m in messages]
        self.deleted.extend(ids)
        self.delete_calls.append(len(ids))
        return []


def a_record() -> TrackingRecord:
    return TrackingRecord(
        group_id="g", email_id=EMAIL_ID, to="r@example.com", subject="s", sent_at=datetime.now(UTC)
    )


def open_message(message_id: str = "m1", receive_count: int = 1) -> SqsMessage:
    return message(sns_body(ses_event("Open")), message_id, receive_count)


# --- backoff ----------------------------------------------------------------------


def test_nominal_backoff_doubles_from_one_second_up_to_thirty() -> None:
    backoff = ReceiveBackoff()
    assert [backoff.nominal(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


@pytest.mark.parametrize("pick", [min, max])
def test_backoff_gap_stays_between_half_and_all_of_nominal(
    pick: Callable[[float, float], float],
) -> None:
    backoff = ReceiveBackoff(uniform=pick)
    for failures in range(1, 8):
        nominal = backoff.nominal(failures)
        assert nominal / 2 <= backoff.delay(failures) <= nominal


def test_backoff_gap_is_clamped_even_if_the_random_source_misbehaves() -> None:
    backoff = ReceiveBackoff(uniform=lambda low, high: -5.0)
    assert backoff.delay(3) == 2.0


async def test_third_consecutive_receive_failure_aborts_after_two_backoff_gaps() -> None:
    queue = FakeQueue([SqsError("down"), SqsError("down"), SqsError("down")])
    gaps: list[float] = []

    async def sleep(seconds: float) -> None:
        gaps.append(seconds)

    with trio.fail_after(5), pytest.raises(PollerAborted):
        await poll_engagement_events(
            queue,
            FakeStore(None),
            PollerSettings(),
            sleep=sleep,
            backoff=ReceiveBackoff(uniform=lambda low, high: low),
        )
    assert queue.receives == 3
    assert gaps == [0.5, 1.0]


async def test_a_successful_receive_resets_the_failure_count() -> None:
    queue = FakeQueue(
        [SqsError("x"), SqsError("x"), [], SqsError("x"), SqsError("x"), SqsError("x")]
    )
    gaps: list[float] = []

    async def sleep(seconds: float) -> None:
        gaps.append(seconds)

    with trio.fail_after(5), pytest.raises(PollerAborted):
        await poll_engagement_events(
            queue, FakeStore(None), sleep=sleep, backoff=ReceiveBackoff(uniform=max)
        )
    assert queue.receives == 6
    assert gaps == [1.0, 2.0, 1.0, 2.0]


# --- outcomes ---------------------------------------------------------------------


async def poll_until_deleted(
    count: int, queue: FakeQueue, store: RecordUpdater, settings: PollerSettings | None = None
) -> None:
    """Run the poller until ``count`` messages were deleted (AssertionError after
    5 s), then stop it: no fixed run time to guess."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll_engagement_events, queue, store, settings or PollerSettings())
        await wait_for(
            lambda: len(queue.deleted) >= count,
            message=f"{len(queue.deleted)} of {count} messages deleted",
        )
        nursery.cancel_scope.cancel()


async def test_applied_event_is_deleted_and_recorded() -> None:
    store = FakeStore(a_record())
    queue = FakeQueue([[open_message("m1")]])
    await poll_until_deleted(1, queue, store)
    assert queue.deleted == ["m1"]
    assert store.record is not None
    assert store.record.open_count == 1


async def test_poison_messages_are_deleted() -> None:
    bodies = ["not json", json.dumps({"Type": "Notification"}), sns_body({"eventType": "Open"})]
    queue = FakeQueue([[message(body, f"p{n}") for n, body in enumerate(bodies)]])
    await poll_until_deleted(3, queue, FakeStore(a_record()))
    assert sorted(queue.deleted) == ["p0", "p1", "p2"]


async def test_messages_handled_one_at_a_time_are_deleted_in_one_batch() -> None:
    queue = FakeQueue([[open_message(f"m{n}") for n in range(10)]])
    await poll_until_deleted(10, queue, FakeStore(a_record()), PollerSettings(concurrency=1))
    assert sorted(queue.deleted) == sorted(f"m{n}" for n in range(10))
    assert queue.delete_calls == [10]


async def test_store_error_leaves_the_message() -> None:
    handler = EventHandler(FakeStore(a_record(), error=StoreError("down")), max_receives=5)
    assert await handler.handle(open_message(receive_count=50)) == ("open", "retry")


async def test_missing_record_is_left_while_receive_count_is_at_most_max() -> None:
    handler = EventHandler(FakeStore(None), max_receives=2)
    assert await handler.handle(open_message(receive_count=2)) == ("open", "retry")


async def test_missing_record_is_deleted_after_max_receives() -> None:
    handler = EventHandler(FakeStore(None), max_receives=2)
    assert await handler.handle(open_message(receive_count=3)) == ("open", "deleted")


async def test_replayed_event_is_a_duplicate() -> None:
    handler = EventHandler(FakeStore(a_record()), max_receives=5)
    body = sns_body(ses_event("Open"))
    assert await handler.handle(message(body, "m1")) == ("open", "applied")
    assert await handler.handle(message(body, "m2")) == ("open", "duplicate")


async def test_handling_is_concurrent_up_to_the_limit() -> None:
    running = 0
    peak = 0

    class SlowStore:
        async def update_record(
            self, email_id: str, change: Callable[[TrackingRecord], bool]
        ) -> TrackingRecord | None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await trio.sleep(0.05)
            running -= 1
            return a_record()

    batch = [open_message(f"m{n}") for n in range(10)]
    queue = FakeQueue([batch, list(batch)])
    await poll_until_deleted(20, queue, SlowStore(), PollerSettings(concurrency=4))
    assert peak == 4
    assert len(queue.deleted) == 20
