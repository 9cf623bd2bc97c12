"""``lfx.email-service.get_email_engagement_analytics``: counting rules against
an in-memory store, then the contract end to end (relay process, nats-server)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from emailrelay import api
from emailrelay.handlers.analytics import GetEngagementAnalyticsHandler
from emailrelay.handlers.replies import encode_reply
from emailrelay.store.tracking import TrackingStore
from tests.support.fakes import MemoryKeyValue
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer
from tests.support.tracking_calls import analytics, put_record, send, unique_group

OPENS = [
    {"event_id": "m1", "opened_at": "2024-05-01T11:00:00Z"},
    {"event_id": "m2", "opened_at": "2024-05-01T12:00:00Z"},
]


async def test_unreadable_record_batches_are_skipped_not_an_error() -> None:
    records, groups = MemoryKeyValue(), MemoryKeyValue()
    store = TrackingStore(records, groups)
    for n in range(300):
        body = {"group_id": "g", "email_id": f"e{n}", "to": "a@example.org", "subject": "s"}
        records.put(f"e{n}", json.dumps({**body, "sent_at": "2024-05-01T10:00:00Z"}).encode())
        await store.append_to_group("g", f"e{n}")
    records.failing_keys.add("e0")  # the first batch of 250 cannot be read
    reply = json.loads(
        encode_reply(await GetEngagementAnalyticsHandler(store)(b'{"group_id": "g"}'))
    )
    assert reply["total_sent"] == 300
    assert reply["delivered"] == 0


async def test_unreadable_group_index_is_an_internal_error() -> None:
    records, groups = MemoryKeyValue(), MemoryKeyValue()
    store = TrackingStore(records, groups)
    await store.append_to_group("g", "e1")
    groups.closed = True
    reply = json.loads(
        encode_reply(await GetEngagementAnalyticsHandler(store)(b'{"group_id": "g"}'))
    )
    assert reply == {"error": api.ERR_INTERNAL}


@pytest.fixture(scope="module")
def relay(nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    with running_relay(nats_server, smtp_server) as process:
        yield process


def test_analytics_counts_the_group_records(relay: RelayProcess, nats_client: SyncNats) -> None:
    group = unique_group()
    email_ids = [str(uuid.uuid4()) for _ in range(5)]
    put_record(
        nats_client,
        email_ids[0],
        group,
        delivered=True,
        delivered_at="2024-05-01T10:01:00Z",
        clicked=True,
        click_count=2,
    )
    put_record(
        nats_client,
        email_ids[1],
        group,
        delivered=True,
        delivered_at="2024-05-01T10:01:00Z",
        opened=True,
        open_count=2,
        opened_at_list=OPENS,
        last_opened_at="2024-05-01T12:00:00Z",
    )
    put_record(
        nats_client,
        email_ids[2],
        group,
        opened=True,
        open_count=1,
        opened_at_list=OPENS[:1],
        last_opened_at="2024-05-01T11:00:00Z",
    )
    put_record(nats_client, email_ids[3], group, failed=True, failed_at="2024-05-01T10:02:00Z")
    put_record(nats_client, email_ids[4], group)
    nats_client.kv_put(api.GROUP_INDEX_BUCKET, group, email_ids)
    assert analytics(nats_client, group_id=group) == {
        "group_id": group,
        "total_sent": 5,
        "delivered": 2,
        "opened": 3,
        "unique_opened": 2,
        "failed": 1,
        "clicked": 2,
        "unique_clicked": 1,
    }


def test_analytics_of_sent_emails_counts_them_as_sent(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    group = unique_group("Grüße @ batch")
    for _ in range(3):
        send(nats_client, group_id=group)
    reply = analytics(nats_client, group_id=group)
    assert reply == {
        "group_id": group,
        "total_sent": 3,
        "delivered": 0,
        "opened": 0,
        "unique_opened": 0,
        "failed": 0,
        "clicked": 0,
        "unique_clicked": 0,
    }


def test_unreadable_records_are_skipped_but_still_sent(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    group = unique_group()
    good, missing, corrupt = (str(uuid.uuid4()) for _ in range(3))
    put_record(nats_client, good, group, delivered=True, delivered_at="2024-05-01T10:01:00Z")
    nats_client.kv_put(api.RECIPIENTS_BUCKET, corrupt, b"{not json")
    nats_client.kv_put(api.GROUP_INDEX_BUCKET, group, [good, missing, corrupt])
    reply = analytics(nats_client, group_id=group)
    assert (reply["total_sent"], reply["delivered"]) == (3, 1)


def test_empty_index_counts_zero(relay: RelayProcess, nats_client: SyncNats) -> None:
    group = unique_group()
    nats_client.kv_put(api.GROUP_INDEX_BUCKET, group, b"[]")
    assert analytics(nats_client, group_id=group)["total_sent"] == 0


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"nope", api.ERR_INVALID_PAYLOAD),
        (b"[1]", api.ERR_INVALID_PAYLOAD),
        (b'{"group_id": 3}', api.ERR_INVALID_PAYLOAD),
        (b"{}", api.ERR_GROUP_ID_REQUIRED),
        (b'{"group_id": ""}', api.ERR_GROUP_ID_REQUIRED),
        (b'{"group_id": "no-such-group-91e2"}', api.ERR_NOT_FOUND),
        (b'{"group_id": "no such group @ all"}', api.ERR_NOT_FOUND),
    ],
)
def test_analytics_error_replies(
    relay: RelayProcess, nats_client: SyncNats, payload: bytes, error: str
) -> None:
    assert nats_client.request_json(api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT, payload) == {
        "error": error
    }


def test_store_failure_reading_the_index_is_an_internal_error(smtp_server: SmtpServer) -> None:
    # Buckets deleted under a relay that may not re-create them: the store fails.
    with NatsServer() as server, SyncNats(server.url) as client:
        client.create_bucket(api.RECIPIENTS_BUCKET, max_value_size=64 * 1024, direct=True)
        client.create_bucket(api.GROUP_INDEX_BUCKET, direct=True)
        with running_relay(server, smtp_server, {"KV_AUTO_CREATE": "false"}):
            send(client, group_id="doomed")
            client.delete_bucket(api.RECIPIENTS_BUCKET)
            reply: Any = analytics(client, group_id="doomed")
            assert (reply["total_sent"], reply["delivered"]) == (1, 0)  # records skipped
            client.delete_bucket(api.GROUP_INDEX_BUCKET)
            assert analytics(client, group_id="doomed") == {"error": api.ERR_INTERNAL}
