"""``lfx.email-service.erase_recipient_data`` end to end: a relay process, its
own nats-server and an SMTP server. One recipient among several in shared
groups is erased; the others stay byte for byte; nothing in any bucket,
earlier revisions included, holds the address afterwards; a record written
before the recipient index existed is found by ``emailrelay erase --scan``.
Also: an id twice in a group index is shown and counted once."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

from emailrelay import api
from emailrelay.client import EmailRelayClient, InvalidAddress
from emailrelay.store.tracking import recipient_key
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer
from tests.support.tracking_calls import analytics, put_record, send, status, unique_group

TRACKING_BUCKETS = (api.RECIPIENTS_BUCKET, api.GROUP_INDEX_BUCKET, api.RECIPIENT_INDEX_BUCKET)


@pytest.fixture(scope="module")
def relay(module_nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    env = {"SUPPRESSION_ENABLED": "true"}
    with running_relay(module_nats_server, smtp_server, env) as process:
        yield process


@pytest.fixture
def client(relay: RelayProcess, module_nats_client: SyncNats) -> SyncNats:
    return module_nats_client


def erase(client: SyncNats, recipient: str, **fields: Any) -> Any:
    return client.request_json(api.ERASE_RECIPIENT_DATA_SUBJECT, {"recipient": recipient, **fields})


def bucket_values(client: SyncNats, bucket: str) -> dict[str, bytes]:
    """Every key that holds a value, with its value."""

    async def go() -> dict[str, bytes]:
        kv = await client.js.key_value(bucket)
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return {}
        values = {}
        for key in keys:
            entry = await kv.get(key)
            values[key] = entry.value or b""
        return values

    return client.run(go())


def stream_bodies(client: SyncNats, bucket: str) -> list[bytes]:
    """Every message still in the bucket's stream, earlier revisions included."""

    async def go() -> list[bytes]:
        stream = f"KV_{bucket}"
        info = await client.js.stream_info(stream)
        bodies = []
        if not info.state.messages:
            return []
        for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
            try:
                msg = await client.js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            bodies.append(msg.data or b"")
        return bodies

    return client.run(go())


def snapshot(client: SyncNats) -> dict[str, dict[str, bytes]]:
    return {bucket: bucket_values(client, bucket) for bucket in TRACKING_BUCKETS}


def shared_groups(client: SyncNats, target: str) -> tuple[list[str], list[str], list[str]]:
    """Two groups where ``target`` and others received mail; the target's ids,
    the others' ids, the groups."""
    groups = [unique_group("shared"), unique_group("shared")]
    theirs, others = [], []
    for group in groups:
        for to in ("alice@example.org", target, "bob@example.org", target.upper()):
            reply = send(client, group, to=to)
            (theirs if to.lower() == target.lower() else others).append(reply["email_id"])
    return theirs, others, groups


def test_erasure_removes_the_recipients_records_and_index_entries(client: SyncNats) -> None:
    target = f"erase-{uuid.uuid4().hex[:8]}@example.org"
    theirs, _, groups = shared_groups(client, target)
    reply = erase(client, target)
    assert reply == {"erased_records": 4, "erased_index_entries": 4}
    for email_id in theirs:
        assert status(client, email_id=email_id) == {"error": api.ERR_NOT_FOUND}
    for group in groups:
        listed = [r["email_id"] for r in status(client, group_id=group)]
        assert not set(theirs) & set(listed)
        assert analytics(client, group_id=group)["total_sent"] == 2


def test_erasure_leaves_other_recipients_byte_for_byte(client: SyncNats) -> None:
    target = f"erase-{uuid.uuid4().hex[:8]}@example.org"
    theirs, others, groups = shared_groups(client, target)
    before = snapshot(client)
    erase(client, target)
    after = snapshot(client)
    erased = {*theirs, recipient_key(target), *groups}
    for bucket in TRACKING_BUCKETS:
        untouched = {k: v for k, v in before[bucket].items() if k not in erased}
        assert {k: after[bucket].get(k) for k in untouched} == untouched
    assert set(others) <= set(after[api.RECIPIENTS_BUCKET])
    for group in groups:
        kept = [i for i in json.loads(before[api.GROUP_INDEX_BUCKET][group]) if i not in theirs]
        assert json.loads(after[api.GROUP_INDEX_BUCKET][group]) == kept


def test_no_message_in_any_bucket_holds_the_address_after_erasure(client: SyncNats) -> None:
    target = f"Erase-{uuid.uuid4().hex[:8]}@Example.org"
    send(client, unique_group(), to=f"Some One <{target}>")
    send(client, unique_group(), to=target.lower())
    erase(client, target)
    for bucket in (*TRACKING_BUCKETS, api.IDEMPOTENCY_BUCKET):
        for body in stream_bodies(client, bucket):
            assert target.lower().encode() not in body.lower()


def test_erased_records_are_purged_not_just_hidden(client: SyncNats) -> None:
    target = f"erase-{uuid.uuid4().hex[:8]}@example.org"
    email_id = send(client, unique_group(), to=target)["email_id"]
    erase(client, target)

    async def last_operation() -> str:
        msg = await client.js.get_last_msg(
            f"KV_{api.RECIPIENTS_BUCKET}", f"$KV.{api.RECIPIENTS_BUCKET}.{email_id}"
        )
        return (msg.headers or {}).get("KV-Operation", "")

    assert client.run(last_operation()) == "PURGE"


def test_second_erasure_erases_nothing(client: SyncNats) -> None:
    target = f"erase-{uuid.uuid4().hex[:8]}@example.org"
    send(client, unique_group(), to=target)
    erase(client, target)
    assert erase(client, target) == {"erased_records": 0, "erased_index_entries": 0}


def test_suppression_entry_is_kept_unless_asked(client: SyncNats) -> None:
    target = f"erase-{uuid.uuid4().hex[:8]}@example.org"
    client.request_json(api.SUPPRESSION_ADD_SUBJECT, {"address": target})
    erase(client, target)
    assert (
        client.request_json(api.SUPPRESSION_GET_SUBJECT, {"address": target})["reason"] == "manual"
    )
    erase(client, target, suppression=True)
    found = client.request_json(api.SUPPRESSION_GET_SUBJECT, {"address": target})
    assert found == {"error": api.ERR_NOT_FOUND}
    for body in stream_bodies(client, api.SUPPRESSIONS_BUCKET):
        assert target.encode() not in body


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"[1]", api.ERR_INVALID_PAYLOAD),
        (b'{"recipient": 7}', api.ERR_INVALID_PAYLOAD),
        (b'{"recipient": "a@example.org", "suppression": "yes"}', api.ERR_INVALID_PAYLOAD),
        (b"{}", api.ERR_RECIPIENT_REQUIRED),
        (b'{"recipient": "  "}', api.ERR_RECIPIENT_REQUIRED),
        (b'{"recipient": "a@example.org, b@example.org"}', api.ERR_INVALID_ADDRESS),
        (b'{"recipient": "not an address"}', api.ERR_INVALID_ADDRESS),
    ],
)
def test_erasure_error_replies(client: SyncNats, payload: bytes, error: str) -> None:
    assert json.loads(client.request(api.ERASE_RECIPIENT_DATA_SUBJECT, payload)) == {"error": error}


def test_audit_line_names_the_hash_never_the_address(client: SyncNats, relay: RelayProcess) -> None:
    target = f"audit-{uuid.uuid4().hex[:8]}@example.org"
    send(client, unique_group(), to=target)
    erase(client, target)
    logs = relay.logs()
    assert target not in logs
    audit = [line for line in logs.splitlines() if "recipient data erased" in line]
    assert any('"erased_records": 1' in line or '"erased_records":1' in line for line in audit)


def test_scan_erases_a_record_written_before_the_recipient_index(
    client: SyncNats, module_nats_server: NatsServer, tmp_path: Path
) -> None:
    target = f"old-{uuid.uuid4().hex[:8]}@example.org"
    group = unique_group("old")
    kept = send(client, group, to="carol@example.org")["email_id"]
    old_id = str(uuid.uuid4())
    put_record(client, old_id, group, to=f"Old Timer <{target}>")
    client.kv_put(api.GROUP_INDEX_BUCKET, group, [kept, old_id])
    assert erase(client, target) == {"erased_records": 0, "erased_index_entries": 0}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emailrelay",
            "erase",
            "--recipient",
            target,
            "--scan",
            "--server",
            module_nats_server.url,
            "--state-file",
            str(tmp_path / "state.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"erased_records": 1, "erased_index_entries": 1}
    assert client.kv_get(api.RECIPIENTS_BUCKET, old_id) is None
    assert [r["email_id"] for r in status(client, group_id=group)] == [kept]
    assert not (tmp_path / "state.json").exists()


def test_an_id_twice_in_a_group_index_is_shown_and_counted_once(client: SyncNats) -> None:
    group = unique_group("twice")
    first, second = send(client, group)["email_id"], send(client, group)["email_id"]
    client.kv_put(api.GROUP_INDEX_BUCKET, group, [first, second, first])
    assert [r["email_id"] for r in status(client, group_id=group)] == [first, second]
    assert [r["email_id"] for r in status(client, group_id=group, limit=10)] == [first, second]
    assert analytics(client, group_id=group)["total_sent"] == 2


async def test_client_erase_recipient_data_returns_the_counts(
    relay: RelayProcess, module_nats_server: NatsServer
) -> None:
    target = f"client-{uuid.uuid4().hex[:8]}@example.org"
    async with EmailRelayClient.connect(servers=module_nats_server.url) as relay_client:
        await relay_client.send(**send_request(to=target, group_id=unique_group()))
        first = await relay_client.erase_recipient_data(target)
        again = await relay_client.erase_recipient_data(target.upper())
        with pytest.raises(InvalidAddress):
            await relay_client.erase_recipient_data("not an address")
    assert (first.erased_records, first.erased_index_entries) == (1, 1)
    assert (again.erased_records, again.erased_index_entries) == (0, 0)


def test_interrupted_scan_resumes_from_its_state_file(
    client: SyncNats, module_nats_server: NatsServer, tmp_path: Path
) -> None:
    target = f"resumed-{uuid.uuid4().hex[:8]}@example.org"
    group = unique_group("resumed")
    old_id = str(uuid.uuid4())
    put_record(client, old_id, group, to=target)
    client.kv_put(api.GROUP_INDEX_BUCKET, group, [old_id])
    state = tmp_path / "state.json"
    # As an interrupted scan left it: past every record, with the match it had found.
    state.write_text(
        json.dumps(
            {"recipient_hash": recipient_key(target), "revision": 10**9, "matches": [old_id]}
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "emailrelay", "erase", "--recipient", target, "--scan",
         "--server", module_nats_server.url, "--state-file", str(state), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["erased_records"] == 1
    assert client.kv_get(api.RECIPIENTS_BUCKET, old_id) is None
