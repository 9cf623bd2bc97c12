"""Provider-rate awareness end to end: a relay with ``SMTP_MAX_SEND_RATE`` in
front of an SMTP server of this module's own that answers ``454 Throttling
failure: Maximum sending rate exceeded`` above a set rate, as SES does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from emailrelay import api
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer

PROVIDER_RATE = 4.0
"""Messages per second the smtp_server accepts."""
RELAY_RATE = 10.0
"""SMTP_MAX_SEND_RATE: set above the smtp_server's on purpose, so the smtp_server
throttles and the relay has to slow down."""


@pytest.fixture(scope="module")
def relay(module_nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    env = {"SMTP_MAX_SEND_RATE": str(RELAY_RATE)}
    with running_relay(module_nats_server, smtp_server, env) as process:
        yield process


@pytest.fixture(scope="module")
def caller(module_nats_server: NatsServer, relay: RelayProcess) -> Iterator[SyncNats]:
    with SyncNats(module_nats_server.url) as client:
        yield client


def bodies(n: int) -> list[dict[str, Any]]:
    return [
        {"to": f"user{i}@example.org", "subject": f"m{i}", "html": "<p>x</p>", "text": "x"}
        for i in range(n)
    ]


def test_throttled_sends_are_retried_until_every_message_is_out(
    smtp: SmtpServer, caller: SyncNats, relay: RelayProcess
) -> None:
    smtp.max_rate = PROVIDER_RATE
    replies = caller.request_many(api.SEND_EMAIL_SUBJECT, bodies(12), concurrency=12)
    assert all("email_id" in reply for reply in replies), replies  # no 454 reached a caller
    assert sorted(m.rcpt_tos[0] for m in smtp.messages) == sorted(
        f"user{i}@example.org" for i in range(12)
    )
    assert smtp.throttled > 0  # the smtp_server did throttle: the retries were needed


def test_throttling_lowers_the_send_rate(
    smtp: SmtpServer, caller: SyncNats, relay: RelayProcess
) -> None:
    smtp.max_rate = PROVIDER_RATE
    # The module's relay is shared: the previous test moved the counter already.
    throttled_before = relay.metric("emailrelay_smtp_throttled_total", transport="smtp")
    caller.request_many(api.SEND_EMAIL_SUBJECT, bodies(12), concurrency=12)
    assert relay.metric("emailrelay_smtp_send_rate") < RELAY_RATE
    assert relay.metric("emailrelay_smtp_throttled_total", transport="smtp") > throttled_before


def test_daily_quota_exceeded_fails_fast_with_its_own_log_line_and_metric(
    smtp: SmtpServer, caller: SyncNats, relay: RelayProcess
) -> None:
    smtp.fail_all("MAIL", 454, text="Throttling failure: Daily message quota exceeded.")
    before = relay.metric("emailrelay_smtp_daily_quota_exceeded_total", transport="smtp")
    reply = caller.request_json(api.SEND_EMAIL_SUBJECT, bodies(1)[0])
    assert reply == {"error": api.ERR_DELIVERY_FAILED}
    assert len(smtp.mail_times) == 1  # not retried
    assert (
        relay.metric("emailrelay_smtp_daily_quota_exceeded_total", transport="smtp") == before + 1
    )
    lines = [json.loads(line) for line in relay.stderr().splitlines() if line.startswith("{")]
    assert any("daily message quota" in str(entry.get("msg", "")) for entry in lines)
