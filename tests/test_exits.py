"""Clean exits: a signal exits 0 whatever state NATS is in, and requests cut
off when SHUTDOWN_GRACE_SECONDS runs out still get their one reply."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from emailrelay import api
from tests.conftest import RelayFactory
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import free_port, wait_until

DELIVERY_FAILED = {"error": api.ERR_DELIVERY_FAILED}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_nats_is_down_exits_0(
    relay_factory: RelayFactory, own_nats_server: NatsServer, sig: signal.Signals
) -> None:
    relay = relay_factory({"NATS_URL": own_nats_server.url})
    own_nats_server.stop()
    relay.wait_readyz(503)
    relay.terminate(sig)
    assert relay.wait() == 0, relay.logs()
    assert "Traceback" not in relay.stderr()


def test_sigterm_before_nats_was_ever_reached_exits_0(relay_factory: RelayFactory) -> None:
    relay = relay_factory(
        {"NATS_URL": f"nats://127.0.0.1:{free_port()}", "NATS_CONNECT_TIMEOUT": "60s"},
        wait_ready=False,
    )
    wait_until(lambda: "ConnectionRefusedError" in relay.stderr(), message="no connect attempt")
    relay.terminate()
    assert relay.wait() == 0, relay.logs()


def test_sends_cut_off_by_the_grace_answer_delivery_failed_and_are_never_sent(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    smtp.fail_all("MAIL", 451)  # every send retries until it is cut off
    relay = relay_factory(
        {"MAX_IN_FLIGHT": "2", "SHUTDOWN_GRACE_SECONDS": "1s", "SEND_TIMEOUT": "60s"}
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        replies = pool.submit(
            nats_client.request_many, api.SEND_EMAIL_SUBJECT, [send_request()] * 10, 10, 30.0
        )
        # Two sends retrying, eight waiting behind them.
        wait_until(lambda: relay.metric("emailrelay_request_backlog") == 8, message="no backlog")
        relay.terminate()
        answered = replies.result(timeout=30)
    assert answered == [DELIVERY_FAILED] * 10
    assert smtp.messages == []
    assert relay.wait() == 0, relay.logs()


def test_send_handed_over_before_the_cut_off_gets_the_providers_answer(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    smtp.latency = 2.0  # the final reply to DATA comes after the grace has run out
    relay = relay_factory({"SHUTDOWN_GRACE_SECONDS": "200ms"})
    with ThreadPoolExecutor(max_workers=1) as pool:
        reply = pool.submit(nats_client.request_json, api.SEND_EMAIL_SUBJECT, send_request(), 30.0)
        smtp.wait_for_data(1)  # DATA has begun: the send is handed over
        relay.terminate()
        answered = reply.result(timeout=30)
    assert "email_id" in answered, answered
    assert len(smtp.messages) == 1
    assert relay.wait() == 0, relay.logs()
