"""``lfx.email-service.get_email_status``: handler rules against an in-memory
store, then every contract behaviour end to end (relay process, nats-server)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from nats.errors import NoRespondersError
from nats.js.api import StorageType

from emailrelay import api
from emailrelay.handlers.replies import encode_reply
from emailrelay.handlers.status import GetEmailStatusHandler
from emailrelay.store.keys import group_key
from emailrelay.store.tracking import TrackingStore
from tests.support.fakes import MemoryKeyValue
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import EnvOverrides, RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer
from tests.support.tracking_calls import put_record, send, status, unique_group
from tests.support.transports import on_both_transports
from tests.support.waiting import wait_until

# --- the handler, fast ---------------------------------------------------------


async def handler_with_group(size: int, max_reply: int = 1024 * 1024) -> GetEmailStatusHandler:
    records, groups = MemoryKeyValue(), MemoryKeyValue()
    store = TrackingStore(records, groups)
    for n in range(size):
        email_id = f"e{n:05d}"
        records.put(
            email_id,
            json.dumps(
                {
                    "group_id": "g",
                    "email_id": email_id,
                    "to": "a@example.org",
                    "subject": "s",
                    "sent_at": "2024-05-01T10:00:00Z",
                }
            ).encode(),
        )
        await store.append_to_group("g", email_id)
    return GetEmailStatusHandler(store, lambda: max_reply)


async def ask(handler: GetEmailStatusHandler, **request: Any) -> Any:
    return json.loads(encode_reply(await handler(json.dumps(request).encode())))


async def test_reply_over_the_payload_limit_asks_for_paging() -> None:
    handler = await handler_with_group(50, max_reply=2000)
    assert await ask(handler, group_id="g") == {"error": api.ERR_GROUP_TOO_LARGE}


async def test_reply_that_fits_the_payload_limit_is_the_whole_group() -> None:
    handler = await handler_with_group(50)
    reply = await ask(handler, group_id="g")
    assert [r["email_id"] for r in reply] == [f"e{n:05d}" for n in range(50)]


async def test_offset_without_limit_pages_a_thousand() -> None:
    handler = await handler_with_group(1500)
    reply = await ask(handler, group_id="g", offset=100)
    assert [r["email_id"] for r in reply] == [f"e{n:05d}" for n in range(100, 1100)]


async def test_offset_past_the_end_is_an_empty_page() -> None:
    handler = await handler_with_group(10)
    assert await ask(handler, group_id="g", limit=5, offset=10) == []


@pytest.mark.parametrize(
    "paging",
    [{"limit": 1001}, {"limit": -1}, {"offset": -1}, {"limit": "10"}, {"limit": 1.5}],
)
async def test_paging_fields_out_of_range_are_an_invalid_payload(paging: dict[str, Any]) -> None:
    handler = await handler_with_group(3)
    assert await ask(handler, group_id="g", **paging) == {"error": api.ERR_INVALID_PAYLOAD}


# --- end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(
    nats_server: NatsServer, smtp_server: SmtpServer, transport_relay_env: EnvOverrides
) -> Iterator[RelayProcess]:
    with running_relay(nats_server, smtp_server, transport_relay_env) as process:
        yield process


@on_both_transports
def test_status_by_email_id_is_the_stored_record(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    sent = send(nats_client, group_id=unique_group(), subject="Quarterly report")
    reply = status(nats_client, email_id=sent["email_id"])
    assert reply["email_id"] == sent["email_id"]
    assert reply["group_id"] == sent["group_id"]
    assert reply["to"] == "someone@example.org"
    assert reply["subject"] == "Quarterly report"
    assert reply["open_count"] == 0
    assert reply["delivered"] is False
    assert reply["sent_at"].endswith("Z")


@on_both_transports
def test_status_by_group_id_lists_records_in_index_order(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    group = unique_group()
    sent = [send(nats_client, group_id=group)["email_id"] for _ in range(4)]
    index = json.loads(nats_client.kv_get(api.GROUP_INDEX_BUCKET, group) or b"null")
    assert sorted(index) == sorted(sent)
    assert [r["email_id"] for r in status(nats_client, group_id=group)] == index


def test_status_by_group_can_be_paged(relay: RelayProcess, nats_client: SyncNats) -> None:
    group = unique_group()
    for _ in range(5):
        send(nats_client, group_id=group)
    index = json.loads(nats_client.kv_get(api.GROUP_INDEX_BUCKET, group) or b"null")
    page = status(nats_client, group_id=group, limit=2, offset=1)
    assert [r["email_id"] for r in page] == index[1:3]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"not json", api.ERR_INVALID_PAYLOAD),
        (b"[]", api.ERR_INVALID_PAYLOAD),
        (b'"group"', api.ERR_INVALID_PAYLOAD),
        (b'{"email_id": 7}', api.ERR_INVALID_PAYLOAD),
        (b"{}", api.ERR_STATUS_ID_REQUIRED),
        (b'{"email_id": "", "group_id": ""}', api.ERR_STATUS_ID_REQUIRED),
        (b'{"email_id": "a", "group_id": "b"}', api.ERR_STATUS_ONE_ID_ONLY),
        (b'{"group_id": "g", "limit": 5000}', api.ERR_INVALID_PAYLOAD),
        (b'{"email_id": "no-such-email"}', api.ERR_NOT_FOUND),
        (b'{"email_id": "not a key@all"}', api.ERR_NOT_FOUND),
        (b'{"group_id": "no-such-group-7d1c"}', api.ERR_NOT_FOUND),
        (b'{"group_id": "no such group @ all"}', api.ERR_NOT_FOUND),
        (b'{"group_id": "no-such-group-7d1c", "limit": 10}', api.ERR_NOT_FOUND),
    ],
)
def test_status_error_replies(
    relay: RelayProcess, nats_client: SyncNats, payload: bytes, error: str
) -> None:
    assert nats_client.request_json(api.GET_EMAIL_STATUS_SUBJECT, payload) == {"error": error}


def test_group_with_an_empty_index_answers_an_empty_array(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    group = unique_group()
    nats_client.kv_put(api.GROUP_INDEX_BUCKET, group, b"[]")
    assert status(nats_client, group_id=group) == []


def test_missing_and_undecodable_records_are_left_out_of_a_group(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    group = unique_group()
    good, missing, corrupt = (str(uuid.uuid4()) for _ in range(3))
    put_record(nats_client, good, group)
    nats_client.kv_put(api.RECIPIENTS_BUCKET, corrupt, b"{not json")
    nats_client.kv_put(api.GROUP_INDEX_BUCKET, group, [missing, good, corrupt])
    assert [r["email_id"] for r in status(nats_client, group_id=group)] == [good]


def test_undecodable_record_by_email_id_is_an_internal_error(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    email_id = str(uuid.uuid4())
    nats_client.kv_put(api.RECIPIENTS_BUCKET, email_id, b'{"to": 5}')
    assert status(nats_client, email_id=email_id) == {"error": api.ERR_INTERNAL}


def test_records_written_by_the_original_relay_are_readable(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    group, email_id = unique_group(), str(uuid.uuid4())
    put_record(
        nats_client,
        email_id,
        group,
        delivered=True,
        delivered_at="2024-05-01T10:00:05.123456789Z",
        opened_at_list=[{"event_id": "m1", "opened_at": "2024-05-01T11:00:00+02:00"}],
        opened=True,
        open_count=1,
    )
    nats_client.kv_put(api.GROUP_INDEX_BUCKET, group, [email_id])
    (reply,) = status(nats_client, group_id=group)
    assert reply["delivered"] is True
    assert reply["opened_at_list"][0]["event_id"] == "m1"


def test_group_reply_over_the_nats_payload_limit_asks_for_paging(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    group = unique_group()
    email_ids = [str(uuid.uuid4()) for _ in range(20)]
    for email_id in email_ids:  # 20 records of ~60 KB: more than the 1 MB max payload
        put_record(nats_client, email_id, group, subject="x" * 60_000)
    nats_client.kv_put(api.GROUP_INDEX_BUCKET, group, email_ids)
    assert status(nats_client, group_id=group) == {"error": api.ERR_GROUP_TOO_LARGE}
    page = status(nats_client, group_id=group, limit=5, offset=15)
    assert [r["email_id"] for r in page] == email_ids[15:]


AWKWARD_GROUP_IDS = ["batch 42", "ops@example.org", "Grüße 🎉", ".hidden", "team/2024", "a..b"]


@pytest.mark.parametrize("group_id", AWKWARD_GROUP_IDS)
@on_both_transports
def test_awkward_group_id_round_trips_through_send_and_status(
    relay: RelayProcess, nats_client: SyncNats, group_id: str
) -> None:
    group = f"{group_id} {uuid.uuid4()}"
    sent = send(nats_client, group_id=group)
    assert sent["group_id"] == group
    (record,) = status(nats_client, group_id=group)
    assert record["email_id"] == sent["email_id"]
    assert record["group_id"] == group
    stored = nats_client.kv_get(api.GROUP_INDEX_BUCKET, group_key(group))
    assert json.loads(stored or b"null") == [sent["email_id"]]


def test_group_ids_differing_only_in_awkward_characters_stay_apart(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    suffix = uuid.uuid4()
    groups = [f"a b-{suffix}", f"a_b-{suffix}", f"a@b-{suffix}", f".a_b-{suffix}"]
    sent = {group: send(nats_client, group_id=group)["email_id"] for group in groups}
    for group, email_id in sent.items():
        assert [r["email_id"] for r in status(nats_client, group_id=group)] == [email_id]


# --- store failures, bucket creation: each on a nats-server of its own ---------


def stream_config(client: SyncNats, bucket: str) -> Any:
    async def go() -> Any:
        return (await client.js.stream_info(f"KV_{bucket}")).config

    return client.run(go())


def declare_buckets(client: SyncNats, *, direct: bool = True) -> None:
    """Both buckets as an operator declares them (the deployment's settings)."""
    client.create_bucket(api.RECIPIENTS_BUCKET, max_value_size=64 * 1024, direct=direct)
    client.create_bucket(api.GROUP_INDEX_BUCKET, direct=direct)


def test_store_failure_answers_internal_error_not_not_found(smtp_server: SmtpServer) -> None:
    # A bucket deleted under a relay that may not re-create it: the store fails.
    with NatsServer() as server, SyncNats(server.url) as client:
        declare_buckets(client)
        with running_relay(server, smtp_server, {"KV_AUTO_CREATE": "false"}):
            sent = send(client, group_id="doomed")
            client.delete_bucket(api.RECIPIENTS_BUCKET)
            assert status(client, email_id=sent["email_id"]) == {"error": api.ERR_INTERNAL}
            assert status(client, group_id="doomed") == {"error": api.ERR_INTERNAL}
            client.delete_bucket(api.GROUP_INDEX_BUCKET)
            assert status(client, group_id="doomed") == {"error": api.ERR_INTERNAL}


def test_missing_buckets_are_created_with_the_deployment_settings(
    smtp_server: SmtpServer,
) -> None:
    with (
        NatsServer() as server,
        SyncNats(server.url) as client,
        running_relay(server, smtp_server) as relay,
    ):
        expected = {api.RECIPIENTS_BUCKET: 64 * 1024, api.GROUP_INDEX_BUCKET: 1024 * 1024}
        for bucket, max_value in expected.items():
            config = stream_config(client, bucket)
            assert config.max_msgs_per_subject == 1
            assert config.storage == StorageType.FILE
            assert config.max_msg_size == max_value
            assert config.num_replicas == 1
        assert "created KV bucket" in relay.stdout() + relay.stderr()


def test_kv_auto_create_false_creates_nothing_and_serves_no_queries(
    smtp_server: SmtpServer,
) -> None:
    with (
        NatsServer() as server,
        SyncNats(server.url) as client,
        running_relay(server, smtp_server, {"KV_AUTO_CREATE": "false"}) as relay,
    ):
        streams = client.run(client.js.streams_info())
        assert streams == []
        assert send(client)["email_id"]
        with pytest.raises(NoRespondersError, match="no responders"):
            client.request(api.GET_EMAIL_STATUS_SUBJECT, {"email_id": "x"}, timeout=2)
        assert "KV_AUTO_CREATE=false" in relay.stdout() + relay.stderr()


def test_buckets_declared_after_start_are_used_without_a_restart(
    smtp_server: SmtpServer,
) -> None:
    with (
        NatsServer() as server,
        SyncNats(server.url) as client,
        running_relay(server, smtp_server, {"KV_AUTO_CREATE": "false"}) as relay,
    ):
        with pytest.raises(NoRespondersError, match="no responders"):
            client.request(api.GET_EMAIL_STATUS_SUBJECT, {"email_id": "x"}, timeout=2)
        client.create_bucket(api.RECIPIENTS_BUCKET, max_value_size=64 * 1024)
        client.create_bucket(api.GROUP_INDEX_BUCKET)
        wait_until(
            lambda: "tracking on" in relay.stderr(),
            timeout=20,
            message="the relay did not pick up the buckets",
        )
        sent = send(client, group_id="late-buckets")
        assert status(client, email_id=sent["email_id"])["email_id"] == sent["email_id"]
        assert [r["email_id"] for r in status(client, group_id="late-buckets")] == [
            sent["email_id"]
        ]


def test_without_jetstream_sending_works_and_queries_are_not_served(
    smtp_server: SmtpServer,
) -> None:
    with (
        NatsServer(jetstream=False) as server,
        SyncNats(server.url) as client,
        running_relay(server, smtp_server) as relay,
    ):
        assert send(client)["email_id"]
        with pytest.raises(NoRespondersError, match="no responders"):
            client.request(api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT, {"group_id": "g"}, timeout=2)
        assert "JetStream not available" in relay.stdout() + relay.stderr()


def test_buckets_without_direct_gets_work_and_fail_as_internal_error(
    smtp_server: SmtpServer,
) -> None:
    with NatsServer() as server, SyncNats(server.url) as client:
        declare_buckets(client, direct=False)
        assert not stream_config(client, api.RECIPIENTS_BUCKET).allow_direct
        with running_relay(server, smtp_server, {"KV_AUTO_CREATE": "false"}):
            sent = [send(client, group_id="plain-gets")["email_id"] for _ in range(3)]
            assert sorted(r["email_id"] for r in status(client, group_id="plain-gets")) == sorted(
                sent
            )
            client.delete_bucket(api.RECIPIENTS_BUCKET)
            assert status(client, email_id=sent[0]) == {"error": api.ERR_INTERNAL}
