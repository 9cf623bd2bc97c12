"""A bounded backlog: when MAX_BACKLOG requests wait, the relay leaves the
queue group (the requests go to other replicas; with none left, callers get
"no responders" at once) and comes back once half of it has drained.

The memory bound under a sustained overload is proven in
tests/faults/test_backlog.py (``nox -s faults``)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import nats.errors
import pytest

from emailrelay import api
from tests.conftest import RelayFactory
from tests.faults.load import LoadGenerator
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

PAUSED = "emailrelay_request_intake_paused"


def test_full_backlog_leaves_the_queue_group_until_half_has_drained(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    smtp.latency = 1.0
    relay = relay_factory({"MAX_IN_FLIGHT": "1", "MAX_BACKLOG": "2"})
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(
            nats_client.request_many, api.SEND_EMAIL_SUBJECT, [send_request()] * 3, 3, 30.0
        )
        wait_until(lambda: relay.metric(PAUSED) == 1, message="intake not paused")
        assert relay.metric("emailrelay_request_backlog") == 2
        with pytest.raises(nats.errors.NoRespondersError):
            nats_client.request(api.SEND_EMAIL_SUBJECT, send_request(), timeout=5)
        assert all("email_id" in reply for reply in first.result(timeout=30))
    wait_until(lambda: relay.metric(PAUSED) == 0, message="intake not resumed")
    assert "email_id" in nats_client.request_json(api.SEND_EMAIL_SUBJECT, send_request())
    assert len(smtp.messages) == 4


def test_requests_past_twice_the_backlog_are_answered_delivery_failed_at_once_and_not_sent(
    relay_factory: RelayFactory, nats_server: NatsServer, smtp: SmtpServer
) -> None:
    """A burst lands before intake can pause: past 2 x MAX_BACKLOG waiting,
    each request is answered ``email delivery failed`` on arrival (never a
    silence, never a send); once intake pauses, callers see no responders."""
    smtp.latency = 1.0
    relay_factory({"MAX_IN_FLIGHT": "1", "MAX_BACKLOG": "1"})
    with LoadGenerator(nats_server.url, timeout=30.0) as load:
        burst = [(api.SEND_EMAIL_SUBJECT, json.dumps(send_request()).encode())] * 40
        result = load.run_load(burst, concurrency=40)
        load.settle()
    outcomes = result.outcomes()
    refused = result.with_outcome(api.ERR_DELIVERY_FAILED)
    first_success = min(r.answer.at for r in result.successes() if r.answer is not None)
    assert set(outcomes) <= {"ok", api.ERR_DELIVERY_FAILED, "no responders"}, outcomes
    assert refused, f"no request past the backlog was refused: {outcomes}"
    assert outcomes["ok"] <= 3, outcomes  # one in flight, at most two waiting
    assert all(r.answer is not None and r.answer.at < first_success for r in refused)
    assert result.more_than_one_relay_reply() == []
    assert len(smtp.wait_for_messages(outcomes["ok"])) == outcomes["ok"]
