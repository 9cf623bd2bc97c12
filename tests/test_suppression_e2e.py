"""The suppression list end to end: a relay with ``SUPPRESSION_ENABLED=true``
polling moto's SQS, a real nats-server (``email-suppressions``), an SMTP
server of this module's own; the four ``suppression.*`` subjects and the
``emailrelay suppression`` CLI against it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from emailrelay import api
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import EnvOverrides, RelayProcess, relay_defaults
from tests.support.servers.smtp import SmtpServer
from tests.support.servers.sqs import SqsServer, relay_eventing_env
from tests.support.ses_events import bounce, complaint, sns_body
from tests.support.transports import Outbox, on_both_transports
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def events_queue(sqs_server: SqsServer) -> str:
    return sqs_server.create_queue(f"ses-events-{uuid.uuid4().hex[:8]}", visibility_timeout=1)


@pytest.fixture(scope="module")
def relay(
    module_nats_server: NatsServer,
    smtp_server: SmtpServer,
    sqs_server: SqsServer,
    events_queue: str,
    tmp_path_factory: pytest.TempPathFactory,
    transport_relay_env: EnvOverrides,
) -> Iterator[RelayProcess]:
    env = {
        **relay_defaults(module_nats_server, smtp_server),
        **relay_eventing_env(events_queue, sqs_server.endpoint_url, tmp_path_factory.mktemp("aws")),
        **transport_relay_env,
    }
    with RelayProcess({**env, "SUPPRESSION_ENABLED": "true"}) as process:
        process.wait_ready()
        yield process


@pytest.fixture(scope="module")
def caller(module_nats_server: NatsServer, relay: RelayProcess) -> Iterator[SyncNats]:
    with SyncNats(module_nats_server.url) as client:
        yield client


def new_address() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.org"


def get(caller: SyncNats, address: str) -> Any:
    return caller.request_json(api.SUPPRESSION_GET_SUBJECT, {"address": address})


def add(caller: SyncNats, address: str) -> Any:
    return caller.request_json(api.SUPPRESSION_ADD_SUBJECT, {"address": address})


def send_to(caller: SyncNats, address: str, group_id: str = "") -> Any:
    body = {"to": address, "subject": "hi", "html": "<p>hi</p>", "text": "hi"}
    if group_id:
        body["group_id"] = group_id
    return caller.request_json(api.SEND_EMAIL_SUBJECT, body)


def suppressed(caller: SyncNats, address: str) -> bool:
    return "reason" in get(caller, address)


def test_a_permanent_bounce_through_sqs_suppresses_its_recipient(
    caller: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    address = new_address()
    sqs_server.send(events_queue, sns_body(bounce(address)))
    wait_until(lambda: suppressed(caller, address), timeout=15, message="not suppressed")
    entry = get(caller, address)
    assert entry["reason"] == "bounce"
    assert entry["event"]["bounceType"] == "Permanent"


def test_a_complaint_through_sqs_suppresses_its_recipient(
    caller: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    address = new_address()
    sqs_server.send(events_queue, json.dumps(complaint(address)))  # raw delivery
    wait_until(lambda: suppressed(caller, address), timeout=15, message="not suppressed")
    assert get(caller, address)["reason"] == "complaint"


def test_a_transient_bounce_does_not_suppress(
    caller: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    address, marker = new_address(), new_address()
    sqs_server.send(events_queue, sns_body(bounce(address, "Transient")))
    sqs_server.send(events_queue, sns_body(bounce(marker)))
    wait_until(lambda: sqs_server.queue_depth(events_queue) == 0, timeout=15)
    wait_until(lambda: suppressed(caller, marker), timeout=15)
    assert get(caller, address) == {"error": api.ERR_NOT_FOUND}


@on_both_transports
def test_send_to_a_suppressed_address_is_refused_without_smtp_or_record(
    caller: SyncNats, outbox: Outbox
) -> None:
    address = new_address()
    add(caller, address)
    group = f"g-{uuid.uuid4()}"
    reply = send_to(caller, address.upper(), group_id=group)  # case-insensitive
    assert reply == {"error": api.ERR_RECIPIENT_SUPPRESSED}
    # No message: a send over a pooled connection opens no new one, so what
    # counts is that nothing arrived.
    assert outbox.messages() == []
    assert caller.kv_get(api.GROUP_INDEX_BUCKET, group) is None


def test_send_to_a_display_name_form_of_a_suppressed_address_is_refused(
    caller: SyncNats, smtp: SmtpServer
) -> None:
    address = new_address()
    add(caller, address)
    assert send_to(caller, f"Jane <{address}>") == {"error": api.ERR_RECIPIENT_SUPPRESSED}


def test_contract_errors_come_before_the_suppression_check(caller: SyncNats) -> None:
    address = new_address()
    add(caller, address)
    body = {"to": address, "subject": "hi", "html": "x", "text": "x", "from": "a@evil.example"}
    reply = caller.request_json(api.SEND_EMAIL_SUBJECT, body)
    assert reply == {"error": api.ERR_FROM_DOMAIN_NOT_ALLOWED}


@on_both_transports
def test_send_to_an_address_not_suppressed_goes_out(caller: SyncNats, outbox: Outbox) -> None:
    assert "email_id" in send_to(caller, new_address())
    assert len(outbox.wait_for_messages(1)) == 1


@on_both_transports
def test_removed_address_can_be_sent_to_again(caller: SyncNats, outbox: Outbox) -> None:
    address = new_address()
    add(caller, address)
    removed = caller.request_json(api.SUPPRESSION_REMOVE_SUBJECT, {"address": address.upper()})
    assert removed == {"address": address, "changed": True}
    assert get(caller, address) == {"error": api.ERR_NOT_FOUND}
    assert "email_id" in send_to(caller, address)
    assert len(outbox.wait_for_messages(1)) == 1


def test_add_twice_keeps_the_first_entry(caller: SyncNats) -> None:
    address = new_address()
    assert add(caller, address) == {"address": address, "changed": True}
    assert add(caller, address) == {"address": address, "changed": False}
    assert get(caller, address)["reason"] == "manual"


def test_add_refuses_what_is_not_an_address(caller: SyncNats) -> None:
    assert add(caller, "not an address") == {"error": api.ERR_INVALID_ADDRESS}
    assert add(caller, "") == {"error": api.ERR_ADDRESS_REQUIRED}


def test_get_of_an_address_longer_than_any_entry_is_not_found(caller: SyncNats) -> None:
    over_long = "x" * 320 + "@example.org"
    assert get(caller, over_long) == {"error": api.ERR_NOT_FOUND}


def test_remove_of_an_address_longer_than_any_entry_changes_nothing(caller: SyncNats) -> None:
    over_long = "x" * 320 + "@example.org"
    reply = caller.request_json(api.SUPPRESSION_REMOVE_SUBJECT, {"address": over_long})
    assert reply == {"address": over_long, "changed": False}
    assert add(caller, over_long) == {"error": api.ERR_INVALID_ADDRESS}


def test_list_pages_through_every_suppressed_address(caller: SyncNats) -> None:
    for _ in range(3):
        add(caller, new_address())
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = caller.request_json(api.SUPPRESSION_LIST_SUBJECT, {"limit": 2, "offset": offset})
        assert len(page["suppressions"]) <= 2
        seen += [entry["address"] for entry in page["suppressions"]]
        offset = page["next_offset"]
    everything = caller.request_json(api.SUPPRESSION_LIST_SUBJECT, {"limit": 1000})
    assert seen == [entry["address"] for entry in everything["suppressions"]]
    assert len(seen) >= 3


def test_list_refuses_a_page_size_out_of_range(caller: SyncNats) -> None:
    reply = caller.request_json(api.SUPPRESSION_LIST_SUBJECT, {"limit": 1001})
    assert reply == {"error": api.ERR_INVALID_PAYLOAD}


def test_the_subjects_are_distinct_discovery_endpoints(caller: SyncNats) -> None:
    info = caller.request_json("$SRV.INFO.emailrelay", {})
    names = {endpoint["subject"]: endpoint["name"] for endpoint in info["endpoints"]}
    assert {names[subject] for subject in api.SUPPRESSION_SUBJECTS} == {
        "suppression_get",
        "suppression_list",
        "suppression_add",
        "suppression_remove",
    }


# --- the CLI ------------------------------------------------------------------------


def cli(module_nats_server: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "emailrelay",
            "suppression",
            *args,
            "--server",
            module_nats_server.url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_add_list_and_remove(module_nats_server: NatsServer, caller: SyncNats) -> None:
    address = new_address()
    added = cli(module_nats_server, "add", address)
    assert added.returncode == 0, added.stderr
    assert suppressed(caller, address)
    listed = cli(module_nats_server, "list", "--limit", "1000")
    assert listed.returncode == 0
    assert address in listed.stdout
    removed = cli(module_nats_server, "remove", address)
    assert removed.returncode == 0
    assert not suppressed(caller, address)


def test_cli_get_of_an_address_not_suppressed_exits_1(module_nats_server: NatsServer) -> None:
    done = cli(module_nats_server, "get", new_address())
    assert done.returncode == 1
    assert api.ERR_NOT_FOUND in done.stderr


def test_cli_checks_the_address_before_asking_the_relay(module_nats_server: NatsServer) -> None:
    done = cli(module_nats_server, "add", "not an address")
    assert done.returncode == 2
