"""SQS failing under the engagement poller: twice (it must carry on), three times
in a row (the relay must stop with exit 1 so its orchestrator restarts it).

moto's SQS server sits behind :class:`~tests.faults.proxy.FlakyProxy`, which the
relay reaches through ``AWS_ENDPOINT_URL_SQS``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from emailrelay import api
from tests.faults import figures
from tests.faults.proxy import FlakyProxy
from tests.faults.relays import fault_relay_env, metric_total, scrape
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess
from tests.support.servers.smtp import SmtpServer
from tests.support.servers.sqs import SqsServer, relay_eventing_env
from tests.support.ses_events import ses_event, sns_body
from tests.support.waiting import wait_until

pytestmark = pytest.mark.faults

REGION = "us-east-1"
RECEIVE = "ReceiveMessage"


@pytest.fixture
def flaky_sqs(sqs_server: SqsServer) -> Iterator[FlakyProxy]:
    with FlakyProxy(sqs_server.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def eventing_relay(
    sqs_server: SqsServer, flaky_sqs: FlakyProxy, fault_smtp: SmtpServer, tmp_path: Path
) -> Iterator[tuple[RelayProcess, SyncNats, str]]:
    """A relay polling a fresh queue through the proxy, once it has polled at least once."""
    queue_url = sqs_server.create_queue(f"ses-{uuid.uuid4().hex[:8]}", visibility_timeout=1)
    with NatsServer() as nats, SyncNats(nats.url) as client:
        env = fault_relay_env(
            nats.url,
            fault_smtp,
            "relay-0",
            relay_eventing_env(queue_url, flaky_sqs.url, tmp_path, region=REGION),
        )
        with RelayProcess(env) as relay:
            relay.wait_ready()
            wait_until(lambda: flaky_sqs.calls_of(RECEIVE) + flaky_sqs.waiting >= 1, timeout=15)
            yield relay, client, queue_url


def send_one(client: SyncNats) -> str:
    reply = client.request_json(
        api.SEND_EMAIL_SUBJECT,
        send_request(),
    )
    return str(reply["email_id"])


def delivered_flag(client: SyncNats, email_id: str) -> bool:
    value = client.kv_get(api.RECIPIENTS_BUCKET, email_id)
    return value is not None and bool(json.loads(value).get("delivered"))


def test_sqs_failing_twice_then_recovering_keeps_the_poller_running(
    eventing_relay: tuple[RelayProcess, SyncNats, str],
    flaky_sqs: FlakyProxy,
    sqs_server: SqsServer,
) -> None:
    relay, client, queue_url = eventing_relay
    email_id = send_one(client)

    def failed_receives() -> int:
        return flaky_sqs.calls_of(RECEIVE, 500) + flaky_sqs.calls_of(RECEIVE, 0)

    failed_before = failed_receives()
    flaky_sqs.fail_next(2)  # the receive waiting on moto now is cut: the first failure
    forwarded_before = flaky_sqs.forwarded_of(RECEIVE)
    broke_at = time.time()
    # The fixture's first poll made "a receive succeeded or waits" true already
    # (and a cut receive waits until moto answers it): wait for a receive passed
    # on to moto after the fault, which comes only after both failures.
    wait_until(
        lambda: flaky_sqs.forwarded_of(RECEIVE) > forwarded_before,
        timeout=15,
        message="the poller did not receive again after two failures",
    )
    sqs_server.send(queue_url, sns_body(ses_event("Delivery", email_id=email_id)))
    wait_until(lambda: delivered_flag(client, email_id), timeout=30)
    recovered = time.time() - broke_at

    errors = metric_total(scrape(relay), "emailrelay_sqs_receive_errors")
    failed = failed_receives() - failed_before
    figures.record("receive calls failed", failed)
    figures.record("event applied after the first failure", recovered, "s")
    assert failed == 2
    assert errors == 2
    assert relay.returncode is None
    assert relay.readyz_status() == 200


def test_sqs_failing_three_times_in_a_row_stops_the_relay_with_exit_1(
    eventing_relay: tuple[RelayProcess, SyncNats, str], flaky_sqs: FlakyProxy
) -> None:
    relay, _, _ = eventing_relay
    flaky_sqs.fail_all()
    broke_at = time.time()
    code = relay.wait(timeout=60)
    figures.record("exit after the first failure", time.time() - broke_at, "s")
    assert code == 1, relay.logs()[-3000:]
