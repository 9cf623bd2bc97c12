"""Requests that used to take a replica down: ~4,000-character ids (the key rides in
a JetStream subject; past NATS's 4 KiB control line nats-server closed the relay's
connection, usually for good, while /livez stayed 200)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from emailrelay import api
from tests.faults import figures
from tests.faults.relays import HealthWatch
from tests.faults.scenario import fault_scenario
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.relay import RelayProcess
from tests.support.servers.smtp import SmtpServer

pytestmark = pytest.mark.faults

LONG_ID = "k" * 4000  # every character valid in a KV key

LONG_KEY_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "status by email_id": (api.GET_EMAIL_STATUS_SUBJECT, {"email_id": LONG_ID}),
    "status by group_id": (api.GET_EMAIL_STATUS_SUBJECT, {"group_id": LONG_ID}),
    "analytics": (api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT, {"group_id": LONG_ID}),
    "send": (api.SEND_EMAIL_SUBJECT, send_request(group_id=LONG_ID)),
}


@pytest.fixture(scope="module")
def long_key_relay() -> Iterator[tuple[RelayProcess, SyncNats, SmtpServer]]:
    with SmtpServer() as smtp, fault_scenario(smtp, latency=0.0) as scene:
        yield scene.relays[0], scene.kv, smtp


@pytest.mark.parametrize("case", list(LONG_KEY_REQUESTS))
def test_long_key_request_is_answered_and_the_relay_stays_ready(
    long_key_relay: tuple[RelayProcess, SyncNats, SmtpServer], case: str
) -> None:
    relay, client, _ = long_key_relay
    subject, payload = LONG_KEY_REQUESTS[case]
    with HealthWatch({"relay": relay}) as health:
        started = time.monotonic()
        reply = client.request_json(subject, payload, timeout=10)
        figures.record(f"{case}: reply after", time.monotonic() - started, "s")
        after = client.request_json(api.SEND_EMAIL_SUBJECT, send_request(), timeout=10)
    assert reply.get("error") != api.ERR_INTERNAL, reply
    assert "email_id" in after, after
    assert health.bad == [], f"/livez or /readyz not 200: {health.bad[:5]}"


def test_email_sent_with_a_long_group_id_is_found_by_that_group(
    long_key_relay: tuple[RelayProcess, SyncNats, SmtpServer],
) -> None:
    _, client, _ = long_key_relay
    sent = client.request_json(api.SEND_EMAIL_SUBJECT, send_request(group_id=LONG_ID), timeout=10)
    group = client.request_json(api.GET_EMAIL_STATUS_SUBJECT, {"group_id": LONG_ID}, timeout=10)
    assert sent["group_id"] == LONG_ID
    assert sent["email_id"] in [record["email_id"] for record in group]
