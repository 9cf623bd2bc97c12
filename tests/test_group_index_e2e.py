"""Group indexes past one page, end to end (outside the ``scale`` session):
a relay on a nats-server of this module's own (``smtp`` resets the shared
SMTP server the relay sends to), a group seeded in the
``email-group-index`` and ``email-recipients`` buckets as docs/contract.md
lays them out, then sends and paged status queries on the wire.

Two layouts: the head full at HEAD_CAPACITY ids with the relay's sends going
to overflow page 1, and a legacy head of more than HEAD_CAPACITY ids (the
replaced relay kept every id in the head), which must be read whole and not
be rewritten when the group grows.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from emailrelay import api
from emailrelay.store.keys import group_key, index_page_key
from emailrelay.store.tracking import HEAD_CAPACITY
from tests.support.nats_client import SyncNats
from tests.support.servers.relay import RelayProcess
from tests.support.servers.smtp import SmtpServer


def seed_group(client: SyncNats, group_id: str, count: int) -> list[str]:
    """A head of ``count`` ids, each with its record; the ids in index order."""
    ids = [str(uuid.uuid4()) for _ in range(count)]

    async def put_all() -> None:
        records = await client.js.key_value(api.RECIPIENTS_BUCKET)
        groups = await client.js.key_value(api.GROUP_INDEX_BUCKET)
        sent_at = datetime(2024, 5, 1, tzinfo=UTC)
        for start in range(0, count, 200):
            await asyncio.gather(
                *(
                    records.put(
                        email_id,
                        api.TrackingRecord(
                            group_id=group_id,
                            email_id=email_id,
                            to="jane@example.org",
                            subject="seeded",
                            sent_at=sent_at,
                        ).to_json(),
                    )
                    for email_id in ids[start : start + 200]
                )
            )
        await groups.put(group_key(group_id), json.dumps(ids).encode())

    client.run(put_all(), timeout=60)
    return ids


def status_page(client: SyncNats, group_id: str, offset: int, limit: int) -> list[str]:
    reply: Any = client.request_json(
        api.GET_EMAIL_STATUS_SUBJECT, {"group_id": group_id, "offset": offset, "limit": limit}
    )
    assert isinstance(reply, list), reply
    return [record["email_id"] for record in reply]


def whole_group(client: SyncNats, group_id: str) -> list[str]:
    """Every id, read a page of MAX_STATUS_PAGE at a time."""
    ids: list[str] = []
    while page := status_page(client, group_id, len(ids), api.MAX_STATUS_PAGE):
        ids += page
    return ids


def send_to(client: SyncNats, group_id: str) -> str:
    body = {"to": "jane@example.org", "subject": "hi", "html": "x", "text": "x"}
    reply = client.request_json(api.SEND_EMAIL_SUBJECT, {**body, "group_id": group_id}, timeout=10)
    return str(reply["email_id"])


def stored_ids(client: SyncNats, key: str) -> list[str] | None:
    value = client.kv_get(api.GROUP_INDEX_BUCKET, key)
    return None if value is None else list(json.loads(value))


def test_sends_to_a_full_head_go_to_the_first_page_and_read_back_in_order(
    module_relay: RelayProcess, module_nats_client: SyncNats, smtp: SmtpServer
) -> None:
    group = f"g-{uuid.uuid4()}"
    seeded = seed_group(module_nats_client, group, HEAD_CAPACITY)
    sent = [send_to(module_nats_client, group) for _ in range(2)]
    assert stored_ids(module_nats_client, index_page_key(group, 1)) == sent
    assert stored_ids(module_nats_client, group_key(group)) == seeded
    assert status_page(module_nats_client, group, HEAD_CAPACITY - 1, 3) == [seeded[-1], *sent]
    assert whole_group(module_nats_client, group) == seeded + sent


def test_a_legacy_head_of_more_than_1000_ids_is_read_whole(
    module_relay: RelayProcess, module_nats_client: SyncNats, smtp: SmtpServer
) -> None:
    group = f"legacy-{uuid.uuid4()}"
    seeded = seed_group(module_nats_client, group, HEAD_CAPACITY + 500)
    assert whole_group(module_nats_client, group) == seeded


def test_a_send_to_a_legacy_head_is_appended_after_it_without_rewriting_it(
    module_relay: RelayProcess, module_nats_client: SyncNats, smtp: SmtpServer
) -> None:
    group = f"legacy-{uuid.uuid4()}"
    seeded = seed_group(module_nats_client, group, HEAD_CAPACITY + 500)
    sent = send_to(module_nats_client, group)
    assert stored_ids(module_nats_client, group_key(group)) == seeded
    assert whole_group(module_nats_client, group) == [*seeded, sent]
