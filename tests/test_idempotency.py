"""Idempotency reservations (emailrelay.store.idempotency): every state
transition over the in-memory KV with a fake wall clock, then the race of two
replicas on one key against a real nats-server."""

from __future__ import annotations

import json

import anyio
import pytest
import trio
import trio.testing

from emailrelay import api
from emailrelay.store.buckets import IDEMPOTENCY_MAX_VALUE, idempotency_bucket
from emailrelay.store.idempotency import (
    MAX_KEY_LENGTH,
    Completed,
    IdempotencyStore,
    InProgress,
    Mismatch,
    OutcomeUnknown,
    ReservationLost,
    Reserved,
    entry_key,
    request_fingerprint,
)
from emailrelay.store.keys import is_valid_key
from emailrelay.store.kv import RevisionConflict, StoreError
from tests.support.fakes import MemoryKeyValue
from tests.support.jetstream_kv import replicas_on_one_bucket
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer

STALE_AFTER = 40.0
TTL = 24 * 3600.0
REPLY = api.SendEmailReply(email_id="e-1", group_id="g-1")


class FakeWallClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def request(**fields: str) -> api.SendEmailRequest:
    return api.SendEmailRequest.model_validate(send_request(**fields))


FP = request_fingerprint(request())
OTHER_FP = request_fingerprint(request(subject="other"))


def new_store(
    kv: MemoryKeyValue | None = None,
) -> tuple[IdempotencyStore, MemoryKeyValue, FakeWallClock]:
    kv = kv or MemoryKeyValue()
    clock = FakeWallClock()
    return IdempotencyStore(kv, stale_after=STALE_AFTER, ttl=TTL, wall_clock=clock), kv, clock


async def reserved(store: IdempotencyStore, key: str = "k", fp: str = FP) -> Reserved:
    answer = await store.reserve(key, fp)
    assert isinstance(answer, Reserved)
    return answer


# --- fingerprints and keys --------------------------------------------------


def test_the_fingerprint_is_the_same_in_every_process_and_version() -> None:
    """Replicas compare fingerprints: one computed by another process (or the
    previous release) must match, so the value is pinned. A change of the
    canonical form needs a new version tag ("send_email/v2") and a note."""
    body = {"to": "jane@example.com", "subject": "Hi", "html": "<p>hi</p>", "text": "hi"}
    assert request_fingerprint(api.SendEmailRequest.model_validate(body)) == (
        "cef7adc7e7db475c566b635f81e11a22aa68483d95254cd9b72b2415135a1f44"
    )


def test_same_request_sent_with_its_fields_in_another_order_has_the_same_fingerprint() -> None:
    reordered = json.dumps(dict(reversed(list(send_request().items()))))
    assert request_fingerprint(api.SendEmailRequest.model_validate_json(reordered)) == FP


@pytest.mark.parametrize(
    "field",
    ["to", "subject", "html", "text", "from", "from_display_name", "reply_to", "group_id"],
)
def test_every_field_that_shapes_the_email_changes_the_fingerprint(field: str) -> None:
    assert request_fingerprint(request(**{field: "changed@example.org"})) != FP


def test_an_empty_field_and_an_absent_one_have_the_same_fingerprint() -> None:
    assert request_fingerprint(request(reply_to="", group_id="")) == FP


def test_unknown_fields_do_not_change_the_fingerprint() -> None:
    assert request_fingerprint(request(idempotency_key="x", whatever="y")) == FP


def test_values_cannot_shift_between_fields() -> None:
    # Naive concatenation would make these two alike.
    assert request_fingerprint(request(subject="ab", html="c")) != request_fingerprint(
        request(subject="a", html="bc")
    )


@pytest.mark.parametrize(
    "key", ["k", "x" * MAX_KEY_LENGTH, "Grüße 🎉", "..", ">", "*", "a b\nc", "\udcff"]
)
def test_any_caller_key_maps_to_a_short_valid_kv_key(key: str) -> None:
    encoded = entry_key(key)
    assert is_valid_key(encoded)
    assert len(encoded) == 43


def test_different_caller_keys_map_to_different_kv_keys() -> None:
    assert entry_key("a") != entry_key("A")


# --- reserving ----------------------------------------------------------------


async def test_first_request_with_a_key_reserves_it() -> None:
    store, kv, clock = new_store()
    answer = await reserved(store)
    assert (answer.key, answer.started_at) == (entry_key("k"), clock.now)
    assert json.loads(kv.entries[entry_key("k")].value)["state"] == "in_progress"


async def test_same_key_while_the_first_is_sending_is_in_progress() -> None:
    store, _, clock = new_store()
    first = await reserved(store)
    clock.now += 5
    assert await store.reserve("k", FP) == InProgress(since=first.started_at)


async def test_same_key_with_a_different_request_is_a_mismatch() -> None:
    store, _, _ = new_store()
    await reserved(store)
    assert await store.reserve("k", OTHER_FP) == Mismatch()


async def test_completed_key_answers_the_original_reply() -> None:
    store, _, _ = new_store()
    await store.complete(await reserved(store), REPLY)
    assert await store.reserve("k", FP) == Completed(REPLY)


async def test_completed_key_with_a_different_request_is_a_mismatch() -> None:
    store, _, _ = new_store()
    await store.complete(await reserved(store), REPLY)
    assert await store.reserve("k", OTHER_FP) == Mismatch()


async def test_released_key_can_be_reserved_again() -> None:
    store, kv, _ = new_store()
    await store.release(await reserved(store))
    again = await store.reserve("k", FP)
    assert isinstance(again, Reserved)
    assert again.revision == kv.entries[entry_key("k")].revision


async def test_released_key_is_free_for_a_different_request_too() -> None:
    store, _, _ = new_store()
    await store.release(await reserved(store))
    assert isinstance(await store.reserve("k", OTHER_FP), Reserved)


async def test_key_marked_unknown_answers_outcome_unknown() -> None:
    store, _, _ = new_store()
    await store.mark_unknown(await reserved(store))
    assert await store.reserve("k", FP) == OutcomeUnknown()


async def test_key_in_progress_past_stale_after_answers_outcome_unknown() -> None:
    store, _, clock = new_store()
    await reserved(store)
    clock.now += STALE_AFTER
    assert await store.reserve("k", FP) == OutcomeUnknown()


async def test_key_in_progress_just_before_stale_after_is_still_in_progress() -> None:
    store, _, clock = new_store()
    await reserved(store)
    clock.now += STALE_AFTER - 0.001
    assert isinstance(await store.reserve("k", FP), InProgress)


async def test_unreadable_entry_answers_outcome_unknown_and_is_not_overwritten() -> None:
    store, kv, _ = new_store()
    kv.put(entry_key("k"), b"not json")
    assert await store.reserve("k", FP) == OutcomeUnknown()
    assert kv.entries[entry_key("k")].value == b"not json"


async def test_state_written_by_a_newer_version_answers_outcome_unknown() -> None:
    store, kv, _ = new_store()
    kv.put(entry_key("k"), json.dumps({"state": "someday", "fingerprint": FP}).encode())
    assert await store.reserve("k", FP) == OutcomeUnknown()


async def test_store_failure_passes_through_not_read_as_free() -> None:
    store, kv, _ = new_store()
    kv.closed = True
    with pytest.raises(StoreError):
        await store.reserve("k", FP)


# --- TTL --------------------------------------------------------------------


async def test_completed_key_is_remembered_until_the_ttl() -> None:
    store, _, clock = new_store()
    await store.complete(await reserved(store), REPLY)
    clock.now += TTL - 1
    assert await store.reserve("k", FP) == Completed(REPLY)


async def test_completed_key_is_forgotten_after_the_ttl() -> None:
    store, _, clock = new_store()
    await store.complete(await reserved(store), REPLY)
    clock.now += TTL
    assert isinstance(await store.reserve("k", OTHER_FP), Reserved)


async def test_ttl_counts_from_the_last_write_not_the_reservation() -> None:
    store, _, clock = new_store()
    first = await reserved(store)
    clock.now += 30
    await store.complete(first, REPLY)
    clock.now += TTL - 10  # TTL + 20 after the reservation, TTL - 10 after completion
    assert await store.reserve("k", FP) == Completed(REPLY)


async def test_unknown_outcome_is_forgotten_after_the_ttl() -> None:
    store, _, clock = new_store()
    await store.mark_unknown(await reserved(store))
    clock.now += TTL
    assert isinstance(await store.reserve("k", FP), Reserved)


# --- finishing ----------------------------------------------------------------


async def test_finishing_a_reservation_taken_over_after_expiry_is_reservation_lost() -> None:
    store, _, clock = new_store()
    first = await reserved(store)
    clock.now += TTL
    await reserved(store)
    with pytest.raises(ReservationLost):
        await store.complete(first, REPLY)


async def test_every_finishing_write_is_revision_checked() -> None:
    store, kv, _ = new_store()
    first = await reserved(store)
    kv.conflicts_before_success = 1  # someone wrote in between
    with pytest.raises(ReservationLost):
        await store.release(first)


async def test_reply_with_the_longest_group_id_fits_the_bucket() -> None:
    store, kv, _ = new_store()
    group_id = "\x01" * api.MAX_GROUP_ID_BYTES  # worst case for JSON escaping
    await store.complete(await reserved(store), api.SendEmailReply(email_id="e", group_id=group_id))
    assert len(kv.entries[entry_key("k")].value) <= IDEMPOTENCY_MAX_VALUE - 1024


# --- racing and waiting (fake KV) -------------------------------------------------


async def test_lost_write_races_beyond_the_bound_are_a_conflict_not_a_loop() -> None:
    store, kv, _ = new_store()
    kv.conflicts_before_success = 1000
    with pytest.raises(RevisionConflict):
        await store.reserve("k", FP)


async def test_many_concurrent_reservers_on_one_key_exactly_one_wins() -> None:
    kv = MemoryKeyValue()
    stores = [new_store(kv)[0] for _ in range(20)]
    answers: list[object] = []

    async def one(store: IdempotencyStore) -> None:
        answers.append(await store.reserve("k", FP))

    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(one, store)
    assert sum(isinstance(a, Reserved) for a in answers) == 1
    assert sum(isinstance(a, InProgress) for a in answers) == 19


async def test_waiting_returns_the_reply_once_the_first_completes(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    store, _, _ = new_store()
    first = await reserved(store)

    async def finish_later() -> None:
        await trio.sleep(3)
        await store.complete(first, REPLY)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_later)
        answer = await store.wait_for_outcome("k", FP, until=trio.current_time() + 10)
    assert answer == Completed(REPLY)
    assert 3 <= trio.current_time() < 5


async def test_waiting_reserves_a_key_the_first_released(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    store, _, _ = new_store()
    first = await reserved(store)

    async def fail_later() -> None:
        await trio.sleep(2)
        await store.release(first)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail_later)
        answer = await store.wait_for_outcome("k", FP, until=trio.current_time() + 10)
    assert isinstance(answer, Reserved)


async def test_waiting_stops_at_the_deadline_still_in_progress(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    store, _, _ = new_store()
    await reserved(store)
    start = trio.current_time()
    answer = await store.wait_for_outcome("k", FP, until=start + 7)
    assert isinstance(answer, InProgress)
    assert trio.current_time() == pytest.approx(start + 7)


async def test_waiting_polls_with_backoff_not_in_a_tight_loop(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    store, kv, _ = new_store()
    await reserved(store)
    reads_before = kv.gets
    await store.wait_for_outcome("k", FP, until=trio.current_time() + 10)
    # 0.05 s doubling to a 1 s cap (jittered down to half): at most ~25 reads in 10 s.
    assert kv.gets - reads_before <= 30


async def test_waiting_answers_at_once_when_nothing_is_in_progress(
    mock_clock: trio.testing.MockClock,
) -> None:
    store, _, _ = new_store()
    await store.complete(await reserved(store), REPLY)
    start = trio.current_time()
    assert await store.wait_for_outcome("k", FP, until=start + 10) == Completed(REPLY)
    assert trio.current_time() == start


# --- against nats-server ------------------------------------------------------


async def test_two_replicas_racing_on_each_key_exactly_one_wins_on_nats_server(
    nats_server: NatsServer,
) -> None:
    async with replicas_on_one_bucket(nats_server.url, idempotency_bucket(TTL)) as (a, b):
        stores = [IdempotencyStore(kv, stale_after=STALE_AFTER, ttl=TTL) for kv in (a, b)]
        answers: dict[str, list[object]] = {f"key-{n}": [] for n in range(50)}

        async def one(store: IdempotencyStore, key: str) -> None:
            answers[key].append(await store.reserve(key, FP))

        async with trio.open_nursery() as nursery:
            for key in answers:
                for store in stores:
                    nursery.start_soon(one, store, key)
    for key, got in answers.items():
        kinds = sorted(type(answer).__name__ for answer in got)
        assert kinds == ["InProgress", "Reserved"], key


async def test_full_lifecycle_on_nats_server(nats_server: NatsServer) -> None:
    async with replicas_on_one_bucket(nats_server.url, idempotency_bucket(TTL)) as (a, b):
        first = IdempotencyStore(a, stale_after=STALE_AFTER, ttl=TTL)
        second = IdempotencyStore(b, stale_after=STALE_AFTER, ttl=TTL)
        await first.release(await reserved(first))
        again = await reserved(second)
        assert await first.reserve("k", OTHER_FP) == Mismatch()
        await second.complete(again, REPLY)
        assert await first.reserve("k", FP) == Completed(REPLY)
        await first.mark_unknown(await reserved(first, key="k2"))
        assert await second.reserve("k2", FP) == OutcomeUnknown()


async def test_bucket_ttl_drops_entries_on_nats_server(nats_server: NatsServer) -> None:
    # JetStream's max_age, not the store's own clock, frees the key here.
    async with replicas_on_one_bucket(nats_server.url, idempotency_bucket(1.0)) as (kv, _):
        store = IdempotencyStore(kv, stale_after=STALE_AFTER, ttl=TTL)
        await store.complete(await reserved(store), REPLY)
        with trio.fail_after(10):
            while await kv.get(entry_key("k")) is not None:  # noqa: ASYNC110 (polls the server)
                await trio.sleep(0.1)
        assert isinstance(await store.reserve("k", OTHER_FP), Reserved)
