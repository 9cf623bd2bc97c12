"""NATS service discovery ($SRV.PING / INFO / STATS), end to end against relay processes.

What ``nats micro ls/info/stats`` would show, checked with plain NATS requests
(no ``nats`` CLI comes from the package registries).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import nats.errors
import pytest
from nats.aio.msg import Msg

from emailrelay import __version__, api
from tests.conftest import RelayFactory
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer

CONTRACT_SUBJECTS = (
    api.SEND_EMAIL_SUBJECT,
    api.GET_EMAIL_STATUS_SUBJECT,
    api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT,
    api.ERASE_RECIPIENT_DATA_SUBJECT,
)
SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"


@pytest.fixture(scope="module")
def relay(nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    """One relay for the module (each test reads counters as differences)."""
    with running_relay(nats_server, smtp_server) as process:
        yield process


def email(**fields: str) -> dict[str, str]:
    return send_request(**fields)


def request_message(client: SyncNats, subject: str, payload: bytes) -> Msg:
    """One request; the whole reply message (headers included)."""
    return client.run(client.nc.request(subject, payload, timeout=5))


def collect_replies(
    client: SyncNats, subject: str, want: int, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Publish one request and gather replies until ``want`` arrived or ``timeout``."""

    async def go() -> list[dict[str, Any]]:
        nc = client.nc
        replies: list[dict[str, Any]] = []
        enough = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            replies.append(json.loads(msg.data))
            if len(replies) >= want:
                enough.set()

        inbox = nc.new_inbox()
        subscription = await nc.subscribe(inbox, cb=on_reply)
        await nc.publish(subject, b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), timeout)
        await subscription.unsubscribe()
        return replies

    return client.run(go(), timeout=timeout + 5)


def endpoint_stats(client: SyncNats, subject: str) -> dict[str, Any]:
    stats = client.request_json("$SRV.STATS.emailrelay", b"")
    (endpoint,) = [e for e in stats["endpoints"] if e["subject"] == subject]
    return endpoint


def answering_subjects(client: SyncNats) -> set[str]:
    """The contract subjects some relay answers right now (seen on the wire)."""
    answering = set()
    for subject in CONTRACT_SUBJECTS:
        try:
            client.request(subject, b"{}", timeout=5)
        except nats.errors.NoRespondersError:
            continue
        answering.add(subject)
    return answering


def test_ping_names_the_service_with_a_semver_version(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    ping = nats_client.request_json("$SRV.PING.emailrelay", b"")

    assert ping["type"] == "io.nats.micro.v1.ping_response"
    assert ping["name"] == "emailrelay"
    assert ping["version"] == __version__
    assert re.match(SEMVER, ping["version"])
    assert ping["id"]


def test_every_control_subject_form_answers(relay: RelayProcess, nats_client: SyncNats) -> None:
    service_id = nats_client.request_json("$SRV.PING.emailrelay", b"")["id"]
    types = {
        "PING": "io.nats.micro.v1.ping_response",
        "INFO": "io.nats.micro.v1.info_response",
        "STATS": "io.nats.micro.v1.stats_response",
    }
    for verb, response_type in types.items():
        for subject in (
            f"$SRV.{verb}",
            f"$SRV.{verb}.emailrelay",
            f"$SRV.{verb}.emailrelay.{service_id}",
        ):
            answer = nats_client.request_json(subject, b"")
            assert (answer["type"], answer["id"]) == (response_type, service_id), subject


def test_info_lists_the_served_contract_endpoints_in_their_queue_group(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    info = nats_client.request_json("$SRV.INFO.emailrelay", b"")

    assert info["type"] == "io.nats.micro.v1.info_response"
    assert (info["name"], info["version"]) == ("emailrelay", __version__)
    endpoints = {e["subject"]: e for e in info["endpoints"]}
    assert set(endpoints) == answering_subjects(nats_client)
    assert api.SEND_EMAIL_SUBJECT in endpoints
    for subject, endpoint in endpoints.items():
        assert endpoint["queue_group"] == api.QUEUE_GROUP
        assert endpoint["name"] == subject.rsplit(".", 1)[-1]


def test_stats_count_a_successful_send(
    relay: RelayProcess, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    before = endpoint_stats(nats_client, api.SEND_EMAIL_SUBJECT)

    reply = nats_client.request_json(api.SEND_EMAIL_SUBJECT, email())
    assert reply["email_id"]

    after = endpoint_stats(nats_client, api.SEND_EMAIL_SUBJECT)
    assert after["num_requests"] == before["num_requests"] + 1
    assert after["num_errors"] == before["num_errors"]
    assert after["processing_time"] > before["processing_time"]
    assert after["average_processing_time"] > 0
    assert after["queue_group"] == api.QUEUE_GROUP


def test_stats_count_an_error_reply_with_its_contract_error(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    before = endpoint_stats(nats_client, api.SEND_EMAIL_SUBJECT)

    reply = nats_client.request_json(api.SEND_EMAIL_SUBJECT, b"not json")
    assert reply == {"error": api.ERR_INVALID_PAYLOAD}

    after = endpoint_stats(nats_client, api.SEND_EMAIL_SUBJECT)
    assert after["num_requests"] == before["num_requests"] + 1
    assert after["num_errors"] == before["num_errors"] + 1
    assert after["last_error"] == f"400:{api.ERR_INVALID_PAYLOAD}"


def test_stats_report_when_the_instance_started(relay: RelayProcess, nats_client: SyncNats) -> None:
    stats = nats_client.request_json("$SRV.STATS.emailrelay", b"")

    assert stats["type"] == "io.nats.micro.v1.stats_response"
    started = datetime.strptime(stats["started"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert started.year >= 2024
    for endpoint in stats["endpoints"]:
        assert set(endpoint) >= {
            "name",
            "subject",
            "queue_group",
            "num_requests",
            "num_errors",
            "last_error",
            "processing_time",
            "average_processing_time",
        }


def test_error_reply_carries_service_error_headers_and_the_contract_body(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    message = request_message(nats_client, api.SEND_EMAIL_SUBJECT, b"[]")

    assert json.loads(message.data) == {"error": api.ERR_INVALID_PAYLOAD}
    assert message.headers == {
        "Nats-Service-Error": api.ERR_INVALID_PAYLOAD,
        "Nats-Service-Error-Code": "400",
    }


def test_success_reply_has_no_service_error_headers(
    relay: RelayProcess, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    message = request_message(nats_client, api.SEND_EMAIL_SUBJECT, json.dumps(email()).encode())

    assert "email_id" in json.loads(message.data)
    assert not message.headers


def test_delivery_failure_reply_hides_the_smtp_reason(
    relay: RelayProcess, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    smtp.fail_next_data(554)
    message = request_message(nats_client, api.SEND_EMAIL_SUBJECT, json.dumps(email()).encode())

    assert json.loads(message.data) == {"error": api.ERR_DELIVERY_FAILED}
    assert message.headers == {
        "Nats-Service-Error": api.ERR_DELIVERY_FAILED,
        "Nats-Service-Error-Code": "502",
    }
    stats = endpoint_stats(nats_client, api.SEND_EMAIL_SUBJECT)
    assert stats["last_error"] == f"502:{api.ERR_DELIVERY_FAILED}"


def test_every_instance_answers_ping(
    relay: RelayProcess, relay_factory: RelayFactory, nats_client: SyncNats
) -> None:
    relay_factory()

    pings = collect_replies(nats_client, "$SRV.PING.emailrelay", want=2)

    assert len(pings) == 2
    ids = {ping["id"] for ping in pings}
    assert len(ids) == 2
    for service_id in ids:
        ping = nats_client.request_json(f"$SRV.PING.emailrelay.{service_id}", b"")
        assert ping["id"] == service_id


def test_stopped_instance_no_longer_answers(
    relay: RelayProcess, relay_factory: RelayFactory, nats_client: SyncNats
) -> None:
    first_id = nats_client.request_json("$SRV.PING.emailrelay", b"")["id"]
    other = relay_factory()
    ids = {p["id"] for p in collect_replies(nats_client, "$SRV.PING.emailrelay", want=2)}
    (other_id,) = ids - {first_id}

    assert other.stop() == 0

    with pytest.raises(nats.errors.NoRespondersError):
        nats_client.request(f"$SRV.PING.emailrelay.{other_id}", b"", timeout=5)
    assert nats_client.request_json("$SRV.PING.emailrelay", b"")["id"] == first_id


def test_every_error_string_is_a_contract_error_with_a_service_code() -> None:
    strings = {value for name, value in vars(api).items() if name.startswith("ERR_")}
    assert strings == api.CONTRACT_ERRORS
    assert {api.service_error_code(s) for s in strings} == {"400", "404", "500", "502", "503"}
