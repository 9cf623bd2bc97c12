"""The suppression list: which recipients SES events suppress (pure, over the
documented examples), the store over the in-memory KV, and the same store
end to end against a real nats-server."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from emailrelay.engagement.suppression import suppressions_from_event, suppressions_from_message
from emailrelay.store.buckets import SUPPRESSIONS
from emailrelay.store.keys import is_valid_key
from emailrelay.store.kv import StoreError
from emailrelay.store.suppressions import (
    Suppression,
    SuppressionReason,
    SuppressionStore,
    suppression_key,
)
from tests.support.fakes import MemoryKeyValue
from tests.support.jetstream_kv import replicas_on_one_bucket
from tests.support.servers.nats import NatsServer

EXAMPLES: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "ses-event-examples.json").read_text()
)
NOW = datetime(2024, 5, 1, tzinfo=UTC)


def example(name: str) -> dict[str, Any]:
    return copy.deepcopy(EXAMPLES[name])


def bounce(bounce_type: str, *addresses: str) -> dict[str, Any]:
    event = example("Bounce")
    event["bounce"]["bounceType"] = bounce_type
    event["bounce"]["bouncedRecipients"] = [{"emailAddress": a} for a in addresses]
    return event


def manual(address: str) -> Suppression:
    return Suppression(address, SuppressionReason.MANUAL, NOW)


# --- which recipients an event suppresses -----------------------------------


def test_permanent_bounce_suppresses_the_bounced_recipient() -> None:
    (found,) = suppressions_from_event(example("Bounce"), NOW)
    assert (found.address, found.reason) == ("recipient@example.com", SuppressionReason.BOUNCE)
    assert found.suppressed_at == datetime(2017, 8, 5, 0, 41, 2, 669000, tzinfo=UTC)


def test_bounce_keeps_the_events_details() -> None:
    (found,) = suppressions_from_event(example("Bounce"), NOW)
    assert found.event["bounceType"] == "Permanent"
    assert found.event["status"] == "5.1.1"
    assert found.event["ses_message_id"].startswith("EXAMPLE7c191be45")


def test_complaint_suppresses_the_complained_recipient() -> None:
    (found,) = suppressions_from_event(example("Complaint"), NOW)
    assert (found.address, found.reason) == ("recipient@example.com", SuppressionReason.COMPLAINT)
    assert found.event["complaintFeedbackType"] == "abuse"


def test_identity_notification_bounce_suppresses_only_the_named_recipient() -> None:
    # destination lists three addresses; only jane bounced.
    found = suppressions_from_event(example("notificationType:Bounce"), NOW)
    assert [s.address for s in found] == ["jane@example.com"]


@pytest.mark.parametrize("bounce_type", ["Transient", "Undetermined"])
def test_non_permanent_bounce_suppresses_nobody(bounce_type: str) -> None:
    assert suppressions_from_event(bounce(bounce_type, "a@example.org"), NOW) == []


def test_every_named_recipient_is_suppressed() -> None:
    found = suppressions_from_event(bounce("Permanent", "a@example.org", "b@example.org"), NOW)
    assert [s.address for s in found] == ["a@example.org", "b@example.org"]


@pytest.mark.parametrize("name", ["Delivery", "Open", "Send", "Reject", "DeliveryDelay", "Click"])
def test_other_event_types_suppress_nobody(name: str) -> None:
    assert suppressions_from_event(example(name), NOW) == []


def test_time_falls_back_to_now_without_an_event_timestamp() -> None:
    event = example("Bounce")
    del event["bounce"]["timestamp"]
    assert suppressions_from_event(event, NOW)[0].suppressed_at == NOW


def test_sns_wrapped_and_raw_bodies_give_the_same_suppressions() -> None:
    raw = json.dumps(example("Bounce"))
    wrapped = json.dumps({**EXAMPLES["_sns_envelope_example"], "Message": raw})
    assert suppressions_from_message(wrapped, NOW) == suppressions_from_message(raw, NOW)
    assert len(suppressions_from_message(raw, NOW)) == 1


@pytest.mark.parametrize("body", ["", "[]", "{}", '{"Message": "not json"}', "{" * 5000])
def test_malformed_bodies_suppress_nobody(body: str) -> None:
    assert suppressions_from_message(body, NOW) == []


def test_malformed_recipient_entries_are_skipped() -> None:
    event = bounce("Permanent", "a@example.org")
    event["bounce"]["bouncedRecipients"] += [None, {"emailAddress": 7}, {"emailAddress": " "}]
    assert [s.address for s in suppressions_from_event(event, NOW)] == ["a@example.org"]


# --- keys -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["a@example.org", "x" * 5000 + "@example.org", "Grüße@bücher.example", "..@..", "*>"],
)
def test_any_address_gets_a_short_valid_key(address: str) -> None:
    key = suppression_key(address)
    assert is_valid_key(key)
    assert len(key) == 43


def test_addresses_differing_only_in_case_share_a_key() -> None:
    assert suppression_key("Jane@Example.COM") == suppression_key("jane@example.com")


def test_a_display_name_form_shares_the_bare_addresses_key() -> None:
    assert suppression_key("Jane <jane@example.com>") == suppression_key("jane@example.com")


# --- the store over the in-memory KV -----------------------------------------------


def new_store() -> tuple[SuppressionStore, MemoryKeyValue]:
    kv = MemoryKeyValue()
    return SuppressionStore(kv, conflict_backoff=0.0001), kv


async def test_added_address_is_suppressed_case_insensitively() -> None:
    store, _ = new_store()
    assert await store.add(manual("Jane@Example.com"))
    assert await store.is_suppressed("jane@EXAMPLE.com")


async def test_address_never_added_is_not_suppressed() -> None:
    store, _ = new_store()
    assert not await store.is_suppressed("jane@example.com")


async def test_get_returns_what_was_added() -> None:
    store, _ = new_store()
    (found,) = suppressions_from_event(example("Bounce"), NOW)
    await store.add(found)
    assert await store.get("RECIPIENT@example.com") == found


async def test_adding_twice_keeps_the_first_record() -> None:
    store, _ = new_store()
    (first,) = suppressions_from_event(example("Bounce"), NOW)
    await store.add(first)
    assert not await store.add(manual("recipient@example.com"))
    assert await store.get("recipient@example.com") == first


async def test_removed_address_is_no_longer_suppressed() -> None:
    store, _ = new_store()
    await store.add(manual("a@example.org"))
    assert await store.remove("A@example.org")
    assert not await store.is_suppressed("a@example.org")


async def test_removing_an_address_not_suppressed_says_so() -> None:
    store, _ = new_store()
    assert not await store.remove("a@example.org")


async def test_removed_address_can_be_added_again() -> None:
    store, _ = new_store()
    await store.add(manual("a@example.org"))
    await store.remove("a@example.org")
    assert await store.add(manual("a@example.org"))
    assert await store.is_suppressed("a@example.org")


async def test_records_are_small() -> None:
    store, kv = new_store()
    (found,) = suppressions_from_event(example("Bounce"), NOW)
    await store.add(found)
    assert len(kv.entries[suppression_key(found.address)].value) < 1024


async def test_a_huge_address_still_fits_the_bucket() -> None:
    store, kv = new_store()
    await store.add(manual("x" * 100_000 + "@example.org"))
    assert await store.is_suppressed("x" * 100_000 + "@example.org")
    assert max(len(e.value) for e in kv.entries.values()) < SUPPRESSIONS.max_value_size


async def test_an_unreadable_entry_still_suppresses() -> None:
    store, kv = new_store()
    kv.put(suppression_key("a@example.org"), b"garbage")
    assert await store.is_suppressed("a@example.org")


async def test_store_failure_is_not_read_as_not_suppressed() -> None:
    store, kv = new_store()
    kv.closed = True
    with pytest.raises(StoreError):
        await store.is_suppressed("a@example.org")


async def test_adds_that_lose_races_are_retried_until_they_land() -> None:
    store, kv = new_store()
    kv.conflicts_before_success = 3
    assert await store.add(manual("a@example.org"))
    assert await store.is_suppressed("a@example.org")


async def test_concurrent_adds_of_many_addresses_all_land() -> None:
    store, _ = new_store()
    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(store.add, manual(f"user{n}@example.org"))
    assert len(await store.list(limit=1000)) == 50


async def test_list_pages_cover_every_suppression_once_and_skip_removed_ones() -> None:
    store, _ = new_store()
    for n in range(25):
        await store.add(manual(f"user{n}@example.org"))
    await store.remove("user3@example.org")
    pages = [await store.list(limit=10, offset=offset) for offset in (0, 10, 20)]
    assert [len(page) for page in pages] == [10, 10, 4]
    listed = [s.address for page in pages for s in page]
    assert sorted(listed) == sorted(f"user{n}@example.org" for n in range(25) if n != 3)


@pytest.mark.parametrize(("limit", "offset"), [(0, 0), (1001, 0), (10, -1)])
async def test_list_rejects_bad_paging(limit: int, offset: int) -> None:
    store, _ = new_store()
    with pytest.raises(ValueError, match="limit"):
        await store.list(limit=limit, offset=offset)


# --- against nats-server ----------------------------------------------------------


async def test_bounce_event_suppresses_its_recipient_on_nats_server(
    nats_server: NatsServer,
) -> None:
    async with replicas_on_one_bucket(nats_server.url, SUPPRESSIONS) as (a, b):
        writer, reader = SuppressionStore(a), SuppressionStore(b)
        for found in suppressions_from_message(json.dumps(example("Bounce")), NOW):
            await writer.add(found)
        assert await reader.is_suppressed("Recipient@Example.com")
        assert not await reader.is_suppressed("someone-else@example.com")


async def test_add_list_remove_on_nats_server(nats_server: NatsServer) -> None:
    async with replicas_on_one_bucket(nats_server.url, SUPPRESSIONS) as (a, b):
        one, other = SuppressionStore(a), SuppressionStore(b)
        assert await one.list() == []
        async with anyio.create_task_group() as tg:
            for n in range(30):
                tg.start_soon((one if n % 2 else other).add, manual(f"u{n}@example.org"))
        await other.remove("U7@example.org")
        first, second = await one.list(limit=20), await one.list(limit=20, offset=20)
        assert len(first) + len(second) == 29
        assert not await one.is_suppressed("u7@example.org")
        assert await other.is_suppressed("u8@example.org")
