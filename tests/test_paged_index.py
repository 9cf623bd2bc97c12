"""The paged index (emailrelay.store.index) against an in-memory KV: ids shown
once, pages that hold fewer ids or are gone, the range key, erasure of ids,
and indexes written before range keys existed. End-to-end proofs over
nats-server are in test_lifetime_e2e.py."""

from __future__ import annotations

import json
import uuid

import pytest

from emailrelay.api import TrackingRecord
from emailrelay.handlers.analytics import GetEngagementAnalyticsHandler
from emailrelay.handlers.erasure import EraseRecipientDataHandler
from emailrelay.handlers.replies import encode_reply
from emailrelay.handlers.status import GetEmailStatusHandler
from emailrelay.store.index import HEAD_CAPACITY, PAGE_CAPACITY, PagedIndex
from emailrelay.store.keys import group_key, index_page_key, index_range_key
from emailrelay.store.kv import StoreError
from emailrelay.store.tracking import TrackingStore
from tests.support.fakes import MemoryKeyValue


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def new_index(*, touch_range: bool = False) -> tuple[PagedIndex, MemoryKeyValue]:
    kv = MemoryKeyValue()
    return PagedIndex(kv, "test", touch_range=touch_range, backoff_initial=0.0001), kv


async def filled(
    n: int, name: str = "g", **options: bool
) -> tuple[PagedIndex, MemoryKeyValue, list[str]]:
    index, kv = new_index(**options)
    wanted = ids(n)
    for email_id in wanted:
        await index.append(name, email_id)
    return index, kv, wanted


def stored(kv: MemoryKeyValue, key: str) -> list[str]:
    result: list[str] = json.loads(kv.entries[key].value)
    return result


# --- an id twice in the index (a retried append) -----------------------------


async def test_an_id_on_two_pages_is_listed_once() -> None:
    index, kv, wanted = await filled(HEAD_CAPACITY + 5)
    last = index_page_key("g", 1)
    kv.put(last, json.dumps([*stored(kv, last), wanted[3]]).encode())
    assert await index.ids("g") == wanted


async def test_an_id_twice_is_counted_once_by_paging() -> None:
    index, kv, wanted = await filled(HEAD_CAPACITY + 5)
    last = index_page_key("g", 1)
    kv.put(last, json.dumps([wanted[0], *stored(kv, last)]).encode())
    pages = [await index.ids_slice("g", offset, 300) for offset in range(0, 1200, 300)]
    assert [i for page in pages for i in page or []] == wanted


def record_json(email_id: str, group_id: str, **fields: object) -> bytes:
    body = {"group_id": group_id, "email_id": email_id, "to": "a@example.org", "subject": "s"}
    return json.dumps({**body, "sent_at": "2024-05-01T10:00:00Z", **fields}).encode()


async def duplicated_group() -> tuple[TrackingStore, list[str]]:
    records, groups = MemoryKeyValue(), MemoryKeyValue()
    store = TrackingStore(records, groups)
    wanted = ids(3)
    for email_id in wanted:
        records.put(email_id, record_json(email_id, "g", delivered=True))
    groups.put("g", json.dumps([*wanted, wanted[1]]).encode())
    return store, wanted


async def test_status_by_group_shows_an_id_in_the_index_twice_once() -> None:
    store, wanted = await duplicated_group()
    handler = GetEmailStatusHandler(store, lambda: 1024 * 1024)
    reply = json.loads(encode_reply(await handler(b'{"group_id": "g"}')))
    assert [r["email_id"] for r in reply] == wanted


async def test_analytics_counts_an_id_in_the_index_twice_once() -> None:
    store, _ = await duplicated_group()
    reply = json.loads(
        encode_reply(await GetEngagementAnalyticsHandler(store)(b'{"group_id": "g"}'))
    )
    assert (reply["total_sent"], reply["delivered"]) == (3, 3)


# --- the range key -------------------------------------------------------------


async def test_a_group_that_overflows_its_head_gets_a_range_key() -> None:
    _, kv, _ = await filled(HEAD_CAPACITY + PAGE_CAPACITY + 1)
    assert json.loads(kv.entries[index_range_key("g")].value) == {"first": 1, "last": 2}


async def test_a_group_within_its_head_has_no_other_key() -> None:
    _, kv, _ = await filled(HEAD_CAPACITY)
    assert list(kv.entries) == [group_key("g")]


async def test_expired_head_leaves_the_later_pages_listed_in_order() -> None:
    index, kv, wanted = await filled(HEAD_CAPACITY + 1500)
    del kv.entries[group_key("g")]
    assert await index.ids("g") == wanted[HEAD_CAPACITY:]


async def test_append_after_the_head_expired_goes_after_what_remains() -> None:
    index, kv, wanted = await filled(HEAD_CAPACITY + 10)
    del kv.entries[group_key("g")]
    fresh = PagedIndex(kv, "test")  # another replica: no hints
    await fresh.append("g", "new")
    assert group_key("g") not in kv.entries
    assert await index.ids("g") == [*wanted[HEAD_CAPACITY:], "new"]


async def test_slice_skips_expired_pages_and_counts_what_remains() -> None:
    index, kv, wanted = await filled(HEAD_CAPACITY + 2 * PAGE_CAPACITY + 10)
    del kv.entries[group_key("g")]
    del kv.entries[index_page_key("g", 1)]
    remaining = wanted[HEAD_CAPACITY + PAGE_CAPACITY :]
    assert await index.ids_slice("g", 995, 10) == remaining[995:1005]


async def test_new_page_moves_the_range_past_expired_pages() -> None:
    index, kv, _ = await filled(HEAD_CAPACITY + 2 * PAGE_CAPACITY)
    del kv.entries[index_page_key("g", 1)]
    await index.append("g", "next")
    assert json.loads(kv.entries[index_range_key("g")].value) == {"first": 2, "last": 3}


async def test_every_append_rewrites_the_range_when_records_expire() -> None:
    index, kv, _ = await filled(HEAD_CAPACITY + 1, touch_range=True)
    before = kv.entries[index_range_key("g")].revision
    await index.append("g", "next")
    assert kv.entries[index_range_key("g")].revision > before


async def test_group_with_neither_head_nor_range_is_gone_and_starts_afresh() -> None:
    index, kv, _ = await filled(HEAD_CAPACITY + 10)
    del kv.entries[group_key("g")]
    del kv.entries[index_range_key("g")]
    assert await index.ids("g") is None


# --- indexes written before range keys -----------------------------------------


async def test_pages_written_before_range_keys_are_read_until_one_is_missing() -> None:
    index, kv = new_index()
    legacy = ids(HEAD_CAPACITY + 1200)
    kv.put("g", json.dumps(legacy[:HEAD_CAPACITY]).encode())
    kv.put(index_page_key("g", 1), json.dumps(legacy[1000:2000]).encode())
    kv.put(index_page_key("g", 2), json.dumps(legacy[2000:]).encode())
    assert await index.ids("g") == legacy


async def test_first_append_to_a_group_written_before_range_keys_continues_its_last_page() -> None:
    index, kv = new_index()
    legacy = ids(HEAD_CAPACITY + 1200)
    kv.put("g", json.dumps(legacy[:HEAD_CAPACITY]).encode())
    kv.put(index_page_key("g", 1), json.dumps(legacy[1000:2000]).encode())
    kv.put(index_page_key("g", 2), json.dumps(legacy[2000:]).encode())
    await index.append("g", "new")
    assert stored(kv, index_page_key("g", 2))[-1] == "new"
    assert await index.ids("g") == [*legacy, "new"]


# --- removing ids ---------------------------------------------------------------


async def test_removed_ids_leave_the_others_in_order() -> None:
    index, _, wanted = await filled(HEAD_CAPACITY + PAGE_CAPACITY + 10)
    gone = {wanted[5], wanted[1500], wanted[-1]}
    assert await index.remove("g", gone) == 3
    assert await index.ids("g") == [i for i in wanted if i not in gone]


@pytest.mark.parametrize(("offset", "limit"), [(0, 10), (995, 10), (1990, 30), (2500, 5)])
async def test_paging_stays_correct_after_removals(offset: int, limit: int) -> None:
    index, _, wanted = await filled(HEAD_CAPACITY + PAGE_CAPACITY + 10)
    gone = set(wanted[990:1010]) | set(wanted[1500:1600])
    await index.remove("g", gone)
    remaining = [i for i in wanted if i not in gone]
    assert await index.ids_slice("g", offset, limit) == remaining[offset : offset + limit]


async def test_appends_after_a_removal_from_the_head_go_to_the_end() -> None:
    index, kv, wanted = await filled(HEAD_CAPACITY + 10)
    await index.remove("g", {wanted[0]})
    assert group_key("g") not in kv.entries  # moved to page 0
    other = PagedIndex(kv, "test")
    await other.append("g", "new")
    assert await index.ids("g") == [*wanted[1:], "new"]


async def test_removing_every_id_of_a_small_group_purges_it() -> None:
    index, kv, wanted = await filled(3)
    assert await index.remove("g", set(wanted)) == 3
    assert kv.entries == {}
    assert await index.ids("g") is None


async def test_a_page_left_empty_is_purged() -> None:
    index, kv, wanted = await filled(HEAD_CAPACITY + 5)
    await index.remove("g", set(wanted[HEAD_CAPACITY:]))
    assert index_page_key("g", 1) not in kv.entries
    assert await index.ids("g") == wanted[:HEAD_CAPACITY]


async def test_removing_ids_not_in_the_index_writes_nothing() -> None:
    index, kv, _ = await filled(HEAD_CAPACITY + 5)
    writes = kv.writes
    assert await index.remove("g", {"absent"}) == 0
    assert kv.writes == writes


async def test_a_removal_racing_an_append_loses_neither() -> None:
    index, kv, wanted = await filled(20)
    kv.conflicts_before_success = 2
    assert await index.remove("g", {wanted[0]}) == 1
    await index.append("g", "new")
    assert await index.ids("g") == [*wanted[1:], "new"]


# --- erasure over the store ------------------------------------------------------


class PurgeFailing(MemoryKeyValue):
    """Fails the purge of the keys in ``purge_fails`` (a store lost midway)."""

    def __init__(self) -> None:
        super().__init__()
        self.purge_fails: set[str] = set()

    async def purge(self, key: str, last: int | None = None) -> None:
        if key in self.purge_fails:
            raise StoreError(f"{key}: purge failed")
        await super().purge(key, last)


async def test_erasure_failing_midway_is_finished_by_the_repeat() -> None:
    records, groups = PurgeFailing(), MemoryKeyValue()
    store = TrackingStore(records, groups, recipients=MemoryKeyValue())
    for n in range(3):
        await store.create_record(TrackingRecord.model_validate_json(record_json(f"e{n}", "g")))
        await store.append_to_group("g", f"e{n}")
    handler = EraseRecipientDataHandler(store)
    records.purge_fails.add("e1")
    body = b'{"recipient": "A@example.org"}'
    incomplete = json.loads(encode_reply(await handler(body)))
    records.purge_fails.clear()
    repeat = json.loads(encode_reply(await handler(body)))
    assert incomplete == {"error": "erasure incomplete, safe to repeat"}
    assert repeat["erased_records"] == 2  # e0 went the first time
    assert (records.entries, groups.entries) == ({}, {})
