"""The tracking store against an in-memory KV: key scheme, revision-checked
writes, the paged group index, batch reads. End-to-end proofs of the same
behaviours over nats-server are in test_status.py and test_analytics.py."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import anyio
import pytest

from emailrelay.api import GROUP_INDEX_BUCKET, RECIPIENTS_BUCKET, TrackingRecord
from emailrelay.metrics import KV_CONFLICTS
from emailrelay.store.keys import group_key, index_page_key, is_valid_key
from emailrelay.store.kv import StoreError
from emailrelay.store.tracking import HEAD_CAPACITY, PAGE_CAPACITY, CorruptValue, TrackingStore
from tests.support.fakes import MemoryKeyValue

AWKWARD_GROUP_IDS = [
    "batch 42",
    "ops@example.org",
    "Grüße-🎉",
    ".leading-dot",
    "trailing-dot.",
    "a..b",
    "=starts-with-reserved",
    "=YQ",  # what the encoding of "a" looks like
    "tab\tand\nnewline",
    "*",
    ">",
    "é" * 1000,  # long: hashed
]


def new_store() -> tuple[TrackingStore, MemoryKeyValue, MemoryKeyValue]:
    records, groups = MemoryKeyValue(), MemoryKeyValue()
    return TrackingStore(records, groups, conflict_backoff_initial=0.0001), records, groups


def record(email_id: str, group_id: str = "g", **fields: object) -> TrackingRecord:
    return TrackingRecord.model_validate(
        {
            "group_id": group_id,
            "email_id": email_id,
            "to": "someone@example.org",
            "subject": "hello",
            "sent_at": datetime(2024, 5, 1, tzinfo=UTC),
            **fields,
        }
    )


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def stored_ids(groups: MemoryKeyValue, key: str) -> list[str]:
    result: list[str] = json.loads(groups.entries[key].value)
    return result


# --- keys --------------------------------------------------------------------


@pytest.mark.parametrize("group_id", ["plain", "team/2024.q1", "a-b_c=d", "550e8400-e29b"])
def test_valid_group_id_is_its_own_key(group_id: str) -> None:
    assert group_key(group_id) == group_id


@pytest.mark.parametrize("group_id", AWKWARD_GROUP_IDS)
def test_awkward_group_id_gets_a_valid_key_in_the_reserved_space(group_id: str) -> None:
    key = group_key(group_id)
    assert is_valid_key(key)
    assert key.startswith("=")
    assert len(key) <= 450


def test_ids_differing_only_in_awkward_characters_never_share_a_key() -> None:
    similar = ["a b", "a_b", "a@b", "a\u00a0b", "a/b", ".a b", "a b.", "ab", "=a b", "a  b"]
    similar += [*AWKWARD_GROUP_IDS, "é" * 999 + "e"]
    assert len({group_key(g) for g in similar}) == len(similar)


def test_page_keys_never_equal_a_group_key_or_each_other() -> None:
    groups = [*AWKWARD_GROUP_IDS, "plain", "a.1", "=YQ.1", "YQ.1"]
    group_keys = {group_key(g) for g in groups}
    page_keys = [index_page_key(g, page) for g in groups for page in (1, 2, 10)]
    assert all(is_valid_key(k) for k in page_keys)
    assert len(set(page_keys)) == len(page_keys)
    assert not group_keys & set(page_keys)


# --- records -----------------------------------------------------------------


async def test_created_record_reads_back_equal() -> None:
    store, _, _ = new_store()
    original = record(str(uuid.uuid4()))
    await store.create_record(original)
    assert await store.get_record(original.email_id) == original


async def test_record_and_recipient_index_are_written_together() -> None:
    records, groups, recipients = MemoryKeyValue(), MemoryKeyValue(), MemoryKeyValue()
    store = TrackingStore(records, groups, recipients=recipients)
    original = record(str(uuid.uuid4()))
    await store.create_record(original)
    assert original.email_id in records.entries
    assert [json.loads(e.value) for e in recipients.entries.values()] == [[original.email_id]]


async def test_a_record_write_cut_off_as_its_index_write_fails_raises_only_the_cancellation() -> (
    None
):
    """The record's write is cancelled while its recipient-index write, already
    on the wire, fails: the caller's cancel scope catches the cancellation,
    and no ExceptionGroup escapes past it (a send once answered "internal
    error" that way, after the provider had accepted the email)."""
    records, recipients = MemoryKeyValue(), MemoryKeyValue()
    records.hanging = True
    recipients.late_failure = 0.05
    store = TrackingStore(records, MemoryKeyValue(), recipients=recipients)
    with anyio.move_on_after(0.01) as scope:
        await store.create_record(record(str(uuid.uuid4())))
    assert scope.cancelled_caught
    assert recipients.failures == 1  # the index write did fail inside the scope


async def test_record_id_that_cannot_be_a_key_is_not_found() -> None:
    store, records, _ = new_store()
    assert await store.get_record("not a key@all") is None
    assert records.gets == 0


async def test_failing_store_raises_instead_of_not_found() -> None:
    store, records, _ = new_store()
    records.closed = True
    with pytest.raises(StoreError):
        await store.get_record(str(uuid.uuid4()))


async def test_record_that_does_not_decode_raises_corrupt_value() -> None:
    store, records, _ = new_store()
    records.put("e1", b'{"not": "a record"}')
    with pytest.raises(CorruptValue):
        await store.get_record("e1")


async def test_update_record_retries_conflicts_until_it_lands() -> None:
    store, records, _ = new_store()
    await store.create_record(record("e1"))
    records.conflicts_before_success = 5
    before = KV_CONFLICTS.labels(RECIPIENTS_BUCKET)._value.get()

    def deliver(r: TrackingRecord) -> bool:
        r.delivered = True
        return True

    await store.update_record("e1", deliver)
    stored = await store.get_record("e1")
    assert stored is not None
    assert stored.delivered
    assert KV_CONFLICTS.labels(RECIPIENTS_BUCKET)._value.get() - before == 5


async def test_update_of_missing_record_returns_none() -> None:
    store, _, _ = new_store()
    assert await store.update_record("nope", lambda r: True) is None


async def test_get_records_leaves_out_missing_and_corrupt_records_in_order() -> None:
    store, records, _ = new_store()
    wanted = ids(600)
    for i, email_id in enumerate(wanted):
        if i % 3 == 0:
            records.put(email_id, b"garbage")
        elif i % 3 == 1:
            await store.create_record(record(email_id))
    got = await store.get_records([*wanted, "not a key"])
    assert [r.email_id for r in got] == [e for i, e in enumerate(wanted) if i % 3 == 1]


async def test_get_records_reads_in_batches_not_one_get_each() -> None:
    store, records, _ = new_store()
    wanted = ids(1000)
    for email_id in wanted:
        await store.create_record(record(email_id))
    assert len(await store.get_records(wanted)) == 1000
    assert records.gets == 0
    assert records.batch_gets == 4


async def test_get_records_raises_on_store_failure() -> None:
    store, records, _ = new_store()
    wanted = ids(10)
    for email_id in wanted:
        await store.create_record(record(email_id))
    records.failing_keys.add(wanted[3])
    with pytest.raises(StoreError):
        await store.get_records(wanted)


async def test_get_records_can_skip_unreadable_batches() -> None:
    store, records, _ = new_store()
    wanted = ids(500)
    for email_id in wanted:
        await store.create_record(record(email_id))
    records.failing_keys.add(wanted[0])  # fails the first batch of 250
    got = await store.get_records(wanted, skip_unreadable=True)
    assert [r.email_id for r in got] == wanted[250:]


# --- group index ---------------------------------------------------------------


async def test_first_append_creates_a_plain_json_array() -> None:
    store, _, groups = new_store()
    await store.append_to_group("g", "e1")
    assert stored_ids(groups, "g") == ["e1"]


async def test_appending_an_id_twice_keeps_it_once() -> None:
    store, _, _ = new_store()
    await store.append_to_group("g", "e1")
    await store.append_to_group("g", "e1")
    assert await store.group_ids("g") == ["e1"]


async def test_awkward_group_id_is_indexed_under_its_encoded_key() -> None:
    store, _, groups = new_store()
    await store.append_to_group("ops@example.org", "e1")
    assert stored_ids(groups, group_key("ops@example.org")) == ["e1"]
    assert await store.group_ids("ops@example.org") == ["e1"]
    assert await store.group_ids("ops_example.org") is None


async def test_first_thousand_ids_stay_in_the_plain_array_then_pages_follow() -> None:
    store, _, groups = new_store()
    wanted = ids(2500)
    for email_id in wanted:
        await store.append_to_group("big", email_id)
    assert stored_ids(groups, "big") == wanted[:HEAD_CAPACITY]
    assert stored_ids(groups, index_page_key("big", 1)) == wanted[1000:2000]
    assert stored_ids(groups, index_page_key("big", 2)) == wanted[2000:]
    assert await store.group_ids("big") == wanted


async def test_a_batch_larger_than_a_page_spills_over_several_pages() -> None:
    store, _, _ = new_store()
    wanted = ids(3 * PAGE_CAPACITY + 7)
    async with anyio.create_task_group() as tg:
        for email_id in wanted:
            tg.start_soon(store.append_to_group, "big", email_id)
    assert sorted(await store.group_ids("big") or []) == sorted(wanted)


@pytest.mark.parametrize(
    ("offset", "limit"), [(0, 10), (995, 10), (1000, 1000), (1999, 2), (2490, 100), (5000, 5)]
)
async def test_group_slice_matches_the_whole_index(offset: int, limit: int) -> None:
    store, _, _ = new_store()
    wanted = ids(2500)
    for email_id in wanted:
        await store.append_to_group("big", email_id)
    assert await store.group_ids_slice("big", offset, limit) == wanted[offset : offset + limit]


async def test_legacy_head_longer_than_a_thousand_stays_readable_and_grows() -> None:
    store, _, groups = new_store()
    legacy = ids(1500)
    groups.put("old", json.dumps(legacy).encode())
    new = ids(3)
    for email_id in new:
        await store.append_to_group("old", email_id)
    assert stored_ids(groups, "old") == legacy
    assert await store.group_ids("old") == legacy + new
    assert await store.group_ids_slice("old", 1499, 3) == [legacy[-1], *new[:2]]


async def test_concurrent_appends_to_one_group_are_coalesced() -> None:
    store, _, groups = new_store()
    wanted = ids(200)
    async with anyio.create_task_group() as tg:
        for email_id in wanted:
            tg.start_soon(store.append_to_group, "hot", email_id)
    assert sorted(await store.group_ids("hot") or []) == sorted(wanted)
    assert groups.writes <= 5


async def test_appends_from_many_processes_lose_nothing() -> None:
    records, groups = MemoryKeyValue(), MemoryKeyValue()
    stores = [TrackingStore(records, groups, conflict_backoff_initial=0.0001) for _ in range(3)]
    wanted = ids(2600)
    before = KV_CONFLICTS.labels(GROUP_INDEX_BUCKET)._value.get()
    async with anyio.create_task_group() as tg:
        for i, email_id in enumerate(wanted):
            tg.start_soon(stores[i % 3].append_to_group, "hot", email_id)
    index = await stores[0].group_ids("hot") or []
    assert sorted(index) == sorted(wanted)
    assert KV_CONFLICTS.labels(GROUP_INDEX_BUCKET)._value.get() > before


async def test_append_retries_conflicts_until_it_lands() -> None:
    store, _, groups = new_store()
    await store.append_to_group("g", "e1")
    groups.conflicts_before_success = 7
    await store.append_to_group("g", "e2")
    assert await store.group_ids("g") == ["e1", "e2"]


async def test_failing_append_raises_and_leaves_the_index_as_it_was() -> None:
    store, _, groups = new_store()
    await store.append_to_group("g", "e1")
    groups.closed = True
    with pytest.raises(StoreError):
        await store.append_to_group("g", "e2")
    groups.closed = False
    assert stored_ids(groups, "g") == ["e1"]


async def test_appends_sharing_a_failed_batch_each_raise_their_own_error() -> None:
    store, _, groups = new_store()
    groups.closed = True
    errors: list[BaseException] = []

    async def append(email_id: str) -> None:
        try:
            await store.append_to_group("g", email_id)
        except StoreError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for email_id in ("e1", "e2", "e3"):
            tg.start_soon(append, email_id)
    assert len(errors) == 3
    assert len({id(exc) for exc in errors}) == 3  # one object would collect all tracebacks


async def test_unreadable_index_raises_instead_of_empty() -> None:
    store, _, groups = new_store()
    await store.append_to_group("g", "e1")
    groups.closed = True
    with pytest.raises(StoreError):
        await store.group_ids("g")
    with pytest.raises(StoreError):
        await store.group_ids_slice("g", 0, 10)


async def test_unreadable_overflow_page_raises_instead_of_a_partial_list() -> None:
    store, _, groups = new_store()
    for email_id in ids(1200):
        await store.append_to_group("big", email_id)
    groups.failing_keys.add(index_page_key("big", 1))
    with pytest.raises(StoreError):
        await store.group_ids("big")


async def test_corrupt_index_raises_corrupt_value() -> None:
    store, _, groups = new_store()
    groups.put("g", b'{"not": "an array"}')
    with pytest.raises(CorruptValue):
        await store.group_ids("g")
    with pytest.raises(CorruptValue):
        await store.append_to_group("g", "e1")
    assert groups.entries["g"].value == b'{"not": "an array"}'


async def test_missing_group_is_none() -> None:
    store, _, _ = new_store()
    assert await store.group_ids("nope") is None
    assert await store.group_ids_slice("nope", 0, 5) is None


async def test_stale_tail_hint_starts_over_at_the_head() -> None:
    store, _, groups = new_store()
    for email_id in ids(1100):
        await store.append_to_group("g", email_id)
    groups.entries.clear()  # the group was removed by an operator
    await store.append_to_group("g", "e-new")
    assert stored_ids(groups, "g") == ["e-new"]
    assert await store.group_ids("g") == ["e-new"]
