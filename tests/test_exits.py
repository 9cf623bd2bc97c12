"""Clean exits: a signal exits 0 whatever state NATS is in, and requests cut
off when SHUTDOWN_GRACE_SECONDS runs out still get their one reply."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from emailrelay import api
from tests.conftest import RelayFactory
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess
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


@contextlib.contextmanager
def sends_retrying(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer, count: int, grace: str
) -> Iterator[tuple[RelayProcess, Future[list[Any]]]]:
    """A relay (MAX_IN_FLIGHT=2, SHUTDOWN_GRACE_SECONDS=``grace``) with ``count``
    sends: two retrying a 451 until cut off, the rest waiting in the backlog."""
    smtp.fail_all("MAIL", 451)
    relay = relay_factory(
        {"MAX_IN_FLIGHT": "2", "SHUTDOWN_GRACE_SECONDS": grace, "SEND_TIMEOUT": "120s"}
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        replies = pool.submit(
            nats_client.request_many, api.SEND_EMAIL_SUBJECT, [send_request()] * count, count, 60.0
        )
        wait_until(
            lambda: relay.metric("emailrelay_request_backlog") == count - 2, message="no backlog"
        )
        yield relay, replies


def test_sends_cut_off_by_the_grace_answer_delivery_failed_and_are_never_sent(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    with sends_retrying(relay_factory, nats_client, smtp, 10, "1s") as (relay, replies):
        relay.terminate()
        answered = replies.result(timeout=30)
    assert answered == [DELIVERY_FAILED] * 10
    assert smtp.messages == []
    assert relay.wait() == 0, relay.logs()


def test_send_handed_over_before_the_cut_off_gets_the_providers_answer(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    # The final reply to DATA comes after the grace (0.2 s) has run out, and
    # within the wait for it after the cut-off (DATA_REPLY_WAIT, 1 s).
    smtp.latency = 0.8
    relay = relay_factory({"SHUTDOWN_GRACE_SECONDS": "200ms"})
    with ThreadPoolExecutor(max_workers=1) as pool:
        reply = pool.submit(nats_client.request_json, api.SEND_EMAIL_SUBJECT, send_request(), 30.0)
        smtp.wait_for_data(1)  # DATA has begun: the send is handed over
        relay.terminate()
        answered = reply.result(timeout=30)
    assert "email_id" in answered, answered
    assert len(smtp.messages) == 1
    assert relay.wait() == 0, relay.logs()


def test_a_second_signal_cuts_the_drain_off_at_once(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    with sends_retrying(relay_factory, nats_client, smtp, 4, "120s") as (relay, replies):
        relay.terminate()
        wait_until(lambda: "draining" in relay.stderr(), message="the first signal was not seen")
        assert relay.returncode is None  # draining: the 120 s grace is running
        relay.terminate()
        # Far sooner than the grace: the second signal ended it.
        answered = replies.result(timeout=30)
        code = relay.wait(timeout=30)
    assert answered == [DELIVERY_FAILED] * 4
    assert "second signal" in relay.stderr()
    assert code == 0, relay.logs()
    assert smtp.messages == []


def test_a_query_is_answered_while_every_send_slot_is_held_until_shutdown(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    """Reads have their own budget (MAX_READS_IN_FLIGHT): sends that hold every
    send slot until shutdown cuts them off never hold a status query up."""
    smtp.fail_all("MAIL", 451)  # two sends hold both slots until they are cut off
    relay = relay_factory(
        {"MAX_IN_FLIGHT": "2", "SHUTDOWN_GRACE_SECONDS": "1s", "SEND_TIMEOUT": "60s"}
    )
    query = {"email_id": "no-such-email"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        sends = pool.submit(
            nats_client.request_many, api.SEND_EMAIL_SUBJECT, [send_request()] * 2, 2, 30.0
        )
        wait_until(lambda: len(smtp.mail_times) >= 2, message="the sends did not start")
        assert nats_client.request_json(api.GET_EMAIL_STATUS_SUBJECT, query, 5.0) == {
            "error": api.ERR_NOT_FOUND
        }
        assert not sends.done()
        relay.terminate()
        assert sends.result(timeout=30) == [DELIVERY_FAILED] * 2
    assert relay.wait() == 0, relay.logs()
