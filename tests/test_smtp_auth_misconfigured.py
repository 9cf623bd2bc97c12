"""SMTP credentials set against a server that offers no AUTH: a setting no
retry can cure. The first connection that finds no AUTH fails every send at
once with ``email delivery failed``, one error line names SMTP_USERNAME and
the host (never the credentials), and /readyz answers 503 until a connection
logs in again. End to end: a relay subprocess, nats-server and the suite's
aiosmtpd server without AUTH; the pool's side is in tests/test_smtp_pool.py."""

from __future__ import annotations

import json
import time

import pytest

from emailrelay import api
from tests.conftest import RelayFactory
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.relay import RelayProcess
from tests.support.servers.smtp import SmtpServer

USERNAME = "relay-user-4c1d"
PASSWORD = "relay-password-9e7b"
SEND_TIMEOUT = 20.0


@pytest.fixture
def relay(relay_factory: RelayFactory) -> RelayProcess:
    return relay_factory(
        {
            "SMTP_USERNAME": USERNAME,
            "SMTP_PASSWORD": PASSWORD,
            "SMTP_TLS_MODE": "none",
            "SEND_TIMEOUT": f"{SEND_TIMEOUT:g}s",
        }
    )


def error_lines(relay: RelayProcess) -> list[str]:
    lines = [json.loads(line) for line in relay.logs().splitlines() if line.startswith("{")]
    return [line["msg"] for line in lines if line.get("level") == "error"]


def test_sends_answer_delivery_failed_at_once_without_retrying(
    relay: RelayProcess, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    started = time.monotonic()
    replies = [nats_client.request_json(api.SEND_EMAIL_SUBJECT, send_request()) for _ in range(3)]
    assert replies == [{"error": api.ERR_DELIVERY_FAILED}] * 3
    assert smtp.connections == 3  # one per send: no retries
    assert time.monotonic() - started < SEND_TIMEOUT  # retried, the first alone takes it all
    assert smtp.messages == []


def test_one_error_line_names_the_setting_and_host_never_the_credentials(
    relay: RelayProcess, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    for _ in range(3):
        nats_client.request_json(api.SEND_EMAIL_SUBJECT, send_request())
    (line,) = [m for m in error_lines(relay) if "AUTH" in m]
    assert "SMTP_USERNAME" in line
    assert smtp.host in line
    assert USERNAME not in relay.logs()
    assert PASSWORD not in relay.logs()


def test_readyz_answers_503_once_the_server_offers_no_auth(
    relay: RelayProcess, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    assert relay.readyz_status() == 200
    nats_client.request_json(api.SEND_EMAIL_SUBJECT, send_request())
    relay.wait_readyz(503)
