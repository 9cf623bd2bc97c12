"""``suppression.get`` / ``.remove`` of an address longer than any entry can
hold (over 320 characters): it cannot be on the list, so ``get`` answers
``not found`` and ``remove`` ``changed: false``, without asking the store;
``add`` still refuses it as ``invalid address``. Handlers over the in-memory
KV; end to end in tests/test_suppression_e2e.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from emailrelay import api
from emailrelay.handlers.replies import Reply
from emailrelay.handlers.suppression import (
    AddSuppressionHandler,
    GetSuppressionHandler,
    RemoveSuppressionHandler,
)
from emailrelay.store.suppressions import MAX_ADDRESS_CHARS, SuppressionStore
from tests.support.fakes import MemoryKeyValue

OVER_LONG = "x" * (MAX_ADDRESS_CHARS - len("@example.org") + 1) + "@example.org"


def request(address: str) -> bytes:
    return json.dumps({"address": address}).encode()


def reply_of(reply: Reply) -> Any:
    assert isinstance(reply, BaseModel)
    return reply.model_dump(mode="json")


async def test_get_of_an_over_long_address_is_not_found_without_the_store() -> None:
    kv = MemoryKeyValue()
    kv.closed = True  # any store call would fail
    reply = await GetSuppressionHandler(SuppressionStore(kv))(request(OVER_LONG))
    assert reply == api.ErrorReply(error=api.ERR_NOT_FOUND)


async def test_remove_of_an_over_long_address_changes_nothing_without_the_store() -> None:
    kv = MemoryKeyValue()
    kv.closed = True
    reply = await RemoveSuppressionHandler(SuppressionStore(kv))(request(OVER_LONG))
    assert reply_of(reply) == {"address": OVER_LONG, "changed": False}


async def test_add_of_an_over_long_address_is_an_invalid_address() -> None:
    reply = await AddSuppressionHandler(SuppressionStore(MemoryKeyValue()))(request(OVER_LONG))
    assert reply == api.ErrorReply(error=api.ERR_INVALID_ADDRESS)


async def test_a_long_display_name_still_finds_its_listed_address() -> None:
    store = SuppressionStore(MemoryKeyValue())
    now = datetime(2024, 5, 1, tzinfo=UTC)
    await AddSuppressionHandler(store, lambda: now)(request("jane@example.org"))
    named = f"{'J' * 400} <jane@example.org>"
    found = await GetSuppressionHandler(store)(request(named))
    assert reply_of(found)["address"] == "jane@example.org"
    removed = await RemoveSuppressionHandler(store)(request(named))
    assert reply_of(removed) == {"address": "jane@example.org", "changed": True}
