"""``emailrelay serve`` as a process: draining on signals, readiness, start-up failures."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from emailrelay import api
from tests.conftest import RelayFactory
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import run_relay_once
from tests.support.servers.smtp import SmtpServer, tracked_email_ids
from tests.support.waiting import free_port, wait_until


def email_ids_received(smtp: SmtpServer) -> set[str]:
    return set(tracked_email_ids(smtp.messages))


def drain_with_sends_in_flight(
    relay_factory: RelayFactory,
    nats_client: SyncNats,
    smtp: SmtpServer,
    sig: signal.Signals,
    count: int,
) -> None:
    """Start ``count`` sends against a slow SMTP server, signal the relay while they
    are in flight, and check every one is answered and delivered and the exit is 0."""
    smtp.latency = 0.2
    # A small pool, so the sends queue behind each other and some are still
    # waiting when the signal arrives (with the default of 64 connections all
    # of them could finish in one 0.2 s round).
    relay = relay_factory({"SMTP_POOL_SIZE": "4"})
    with ThreadPoolExecutor(max_workers=1) as pool:
        replies = pool.submit(
            nats_client.request_many, api.SEND_EMAIL_SUBJECT, [send_request()] * count, 64, 30.0
        )
        wait_until(lambda: smtp.messages, timeout=10, message="no send reached SMTP")
        relay.terminate(sig)
        assert len(smtp.messages) < count, "all sends finished before the signal"
        answered = replies.result(timeout=30)
    assert relay.wait(timeout=30) == 0, relay.logs()
    assert len(answered) == count
    assert all("email_id" in reply for reply in answered), answered
    assert {reply["email_id"] for reply in answered} <= email_ids_received(smtp)


def test_sigterm_answers_50_sends_in_flight_and_exits_0(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    drain_with_sends_in_flight(relay_factory, nats_client, smtp, signal.SIGTERM, 50)


def test_sigint_answers_sends_in_flight_and_exits_0(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    drain_with_sends_in_flight(relay_factory, nats_client, smtp, signal.SIGINT, 20)


def test_idle_relay_exits_0_on_sigterm(relay_factory: RelayFactory) -> None:
    relay = relay_factory()
    relay.terminate()
    assert relay.wait() == 0


def test_livez_answers_200(relay_factory: RelayFactory) -> None:
    assert relay_factory().get("/livez").status_code == 200


def test_readyz_follows_nats_down_and_up(
    relay_factory: RelayFactory, own_nats_server: NatsServer, smtp: SmtpServer
) -> None:
    relay = relay_factory({"NATS_URL": own_nats_server.url})
    own_nats_server.stop()
    relay.wait_readyz(503)
    own_nats_server.start()
    relay.wait_readyz(200, timeout=30)
    with SyncNats(own_nats_server.url) as client:
        assert "email_id" in client.request_json(api.SEND_EMAIL_SUBJECT, send_request())
    assert relay.returncode is None


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SMTP_PORT": "abc"}, "SMTP_PORT"),
        ({"EMAIL_ENABLED": "maybe"}, "EMAIL_ENABLED"),
        ({"NATS_URL": "http://x"}, "NATS_URL"),
        ({"SES_EVENTING_ENABLED": "true"}, "SES_ENGAGEMENT_SQS_QUEUE_URL"),
    ],
)
def test_bad_config_exits_2_naming_the_variable(env: dict[str, str], variable: str) -> None:
    code, stdout, stderr = run_relay_once(env)
    assert code == 2, stderr
    lines = (stdout + stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert variable in lines[0]


def test_nats_unreachable_at_start_exits_1(smtp: SmtpServer) -> None:
    env = {"NATS_URL": f"nats://127.0.0.1:{free_port()}", "NATS_CONNECT_TIMEOUT": "2s"}
    started = time.monotonic()
    code, _, stderr = run_relay_once(env, timeout=30)
    assert code == 1, stderr
    assert time.monotonic() - started < 20
    assert "giving up" in stderr
