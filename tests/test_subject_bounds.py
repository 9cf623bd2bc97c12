"""No caller's string reaches a NATS subject unbounded.

A KV key travels in the subject of a direct get; nats-server closes the
connection of a client whose protocol line passes 4 KiB, and before this
bound one status request with a ~4,000-character email id cut the relay off
NATS for good. Keys are bounded before any I/O: fast tests over in-memory
stores, then the same requests against the real nats-server.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from emailrelay import api
from emailrelay.engagement.events import Skipped, parse_message
from emailrelay.store.keys import (
    MAX_KEY_LENGTH,
    MAX_SUBJECT_LENGTH,
    group_key,
    index_page_key,
    is_valid_key,
)
from tests.support.handlers import handlers
from tests.support.nats_client import SyncNats
from tests.support.send_requests import NATS_MAX_PAYLOAD, send_request
from tests.support.servers.relay import RelayProcess
from tests.support.tracking_calls import analytics, send, status

LONGEST_OLD_GROUP_ID = 998 - len(f"{api.TRACKING_HEADER}: /{uuid.uuid4()}")
"""942: the longest group id the replaced relay could ever have stored (docs/contract.md)."""

HUGE = NATS_MAX_PAYLOAD - 100
LONG_ID_SHAPES = {
    "key characters": "a" * HUGE,
    "spaces": "a b" * (HUGE // 3),
    "non-ascii": "é" * (HUGE // 2),
    "reserved prefix": "=" + "a" * HUGE,
    "dots": "a." * (HUGE // 2),
}


async def ask(handler: Any, **request: Any) -> Any:
    return json.loads(await handler(json.dumps(request).encode()))


# --- keys ----------------------------------------------------------------------


@pytest.mark.parametrize("bucket", [api.RECIPIENTS_BUCKET, api.GROUP_INDEX_BUCKET])
def test_the_longest_key_makes_a_subject_of_one_kib(bucket: str) -> None:
    subject = f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{'a' * MAX_KEY_LENGTH}"
    assert len(subject) <= MAX_SUBJECT_LENGTH == 1024


def test_a_key_longer_than_the_bound_is_not_valid() -> None:
    assert is_valid_key("a" * MAX_KEY_LENGTH)
    assert not is_valid_key("a" * (MAX_KEY_LENGTH + 1))


def test_every_group_id_the_replaced_relay_could_store_is_still_its_own_key() -> None:
    group_id = "g" * LONGEST_OLD_GROUP_ID
    assert LONGEST_OLD_GROUP_ID == 942
    assert group_key(group_id) == group_id


def test_a_valid_group_id_too_long_for_a_subject_is_hashed() -> None:
    key = group_key("g" * (MAX_KEY_LENGTH + 1))
    assert key.startswith("==")
    assert len(key) < 64


@pytest.mark.parametrize("shape", LONG_ID_SHAPES)
def test_every_key_of_a_megabyte_group_id_fits_in_a_subject(shape: str) -> None:
    group_id = LONG_ID_SHAPES[shape]
    keys = [group_key(group_id), index_page_key(group_id, 1), index_page_key(group_id, 999)]
    assert all(is_valid_key(key) for key in keys), keys


def test_hashed_group_ids_differing_only_at_the_end_stay_apart() -> None:
    base = "g" * (MAX_KEY_LENGTH + 10)
    assert group_key(base + "1") != group_key(base + "2")


# --- handlers: bounded before any I/O -------------------------------------------


async def test_over_long_email_id_is_not_found_without_a_store_call() -> None:
    h = handlers()
    assert await ask(h.status, email_id="a" * (MAX_KEY_LENGTH + 1)) == {"error": api.ERR_NOT_FOUND}
    assert h.keys_asked == []


async def test_status_by_a_megabyte_group_id_asks_only_bounded_keys() -> None:
    h = handlers()
    assert await ask(h.status, group_id="a" * HUGE) == {"error": api.ERR_NOT_FOUND}
    assert h.keys_asked
    assert all(len(key) <= MAX_KEY_LENGTH for key in h.keys_asked)


async def test_analytics_by_a_megabyte_group_id_asks_only_bounded_keys() -> None:
    h = handlers()
    assert await ask(h.analytics, group_id="a" * HUGE) == {"error": api.ERR_NOT_FOUND}
    assert h.keys_asked
    assert all(len(key) <= MAX_KEY_LENGTH for key in h.keys_asked)


async def test_send_with_the_longest_group_id_writes_only_bounded_keys() -> None:
    h = handlers()
    group_id = "g" * api.MAX_GROUP_ID_BYTES
    reply = await ask(h.send, **send_request(), group_id=group_id)
    assert reply["group_id"] == group_id
    assert all(len(key) <= MAX_KEY_LENGTH for key in h.keys_asked)
    (record,) = await ask(h.status, group_id=group_id)
    assert record["email_id"] == reply["email_id"]


async def test_send_with_a_group_id_over_the_bound_is_an_invalid_payload() -> None:
    h = handlers()
    reply = await ask(h.send, **send_request(), group_id="g" * (api.MAX_GROUP_ID_BYTES + 1))
    assert reply == {"error": api.ERR_INVALID_PAYLOAD}
    assert h.sender.messages == []


async def test_group_id_bound_counts_utf8_bytes() -> None:
    h = handlers()
    reply = await ask(h.send, **send_request(), group_id="é" * (api.MAX_GROUP_ID_BYTES // 2 + 1))
    assert reply == {"error": api.ERR_INVALID_PAYLOAD}


def ses_event_with_tracking_value(value: str) -> str:
    event = {
        "eventType": "Delivery",
        "mail": {"headers": [{"name": api.TRACKING_HEADER, "value": value}]},
        "delivery": {"timestamp": "2024-05-01T10:00:00Z"},
    }
    return json.dumps({"Type": "Notification", "MessageId": "m1", "Message": json.dumps(event)})


def test_ses_event_with_an_over_long_email_id_is_skipped_before_any_lookup() -> None:
    body = ses_event_with_tracking_value("group/" + "e" * (MAX_KEY_LENGTH + 1))
    parsed = parse_message(body, "sqs-1")
    assert isinstance(parsed, Skipped)
    assert parsed.label == "no_tracking_header"


# --- end to end: the real nats-server -------------------------------------------


def assert_still_serving(relay: RelayProcess, client: SyncNats) -> None:
    assert relay.readyz_status() == 200, relay.logs()
    sent = send(client, group_id=f"after-{uuid.uuid4()}")
    assert status(client, email_id=sent["email_id"])["email_id"] == sent["email_id"]


def test_status_with_a_4000_character_email_id_is_not_found_and_the_relay_stays_on_nats(
    module_relay: RelayProcess, module_nats_client: SyncNats
) -> None:
    assert status(module_nats_client, email_id="a" * 4000) == {"error": api.ERR_NOT_FOUND}
    assert_still_serving(module_relay, module_nats_client)
    assert "maximum control line exceeded" not in module_relay.logs()


@pytest.mark.parametrize("ask_group", [status, analytics], ids=["status", "analytics"])
def test_a_4000_character_group_id_is_not_found_and_the_relay_stays_on_nats(
    module_relay: RelayProcess, module_nats_client: SyncNats, ask_group: Any
) -> None:
    assert ask_group(module_nats_client, group_id="a" * 4000) == {"error": api.ERR_NOT_FOUND}
    assert_still_serving(module_relay, module_nats_client)


def test_the_longest_group_id_round_trips_through_send_status_and_analytics(
    module_relay: RelayProcess, module_nats_client: SyncNats
) -> None:
    group_id = f"{uuid.uuid4()}-" + "g" * (api.MAX_GROUP_ID_BYTES - 37)
    sent = send(module_nats_client, group_id=group_id)
    assert sent["group_id"] == group_id
    (record,) = status(module_nats_client, group_id=group_id)
    assert record["group_id"] == group_id
    assert analytics(module_nats_client, group_id=group_id)["total_sent"] == 1
    assert module_nats_client.kv_get(api.GROUP_INDEX_BUCKET, group_key(group_id)) is not None


def test_send_with_a_group_id_over_the_bound_is_an_invalid_payload_end_to_end(
    module_relay: RelayProcess, module_nats_client: SyncNats
) -> None:
    reply = module_nats_client.request_json(
        api.SEND_EMAIL_SUBJECT, {**send_request(), "group_id": "g" * (api.MAX_GROUP_ID_BYTES + 1)}
    )
    assert reply == {"error": api.ERR_INVALID_PAYLOAD}
    assert_still_serving(module_relay, module_nats_client)
