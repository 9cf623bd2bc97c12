"""``GET /metrics`` on PORT: Prometheus text that moves with traffic."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emailrelay import api
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def relay(nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    """One relay for the module (each test reads metrics as differences)."""
    with running_relay(nats_server, smtp_server) as process:
        yield process


def scrape(relay: RelayProcess) -> Samples:
    response = relay.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when it has not been written yet (a labelled
    counter appears on its first increment)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def email(**fields: str) -> dict[str, str]:
    return send_request(**fields)


def test_metrics_are_prometheus_text(relay: RelayProcess) -> None:
    response = relay.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {
        "emailrelay_requests",
        "emailrelay_request_seconds",
        "emailrelay_requests_in_flight",
        "emailrelay_smtp_send_seconds",
        "emailrelay_smtp_replies",
        "emailrelay_smtp_connections",
        "emailrelay_kv_conflicts",
        "emailrelay_sqs_events",
    } <= names


def test_request_and_smtp_counters_move_with_sends(
    relay: RelayProcess, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    before = scrape(relay)

    replies = nats_client.request_many(api.SEND_EMAIL_SUBJECT, [email() for _ in range(3)])
    assert all(reply["email_id"] for reply in replies)
    assert len(smtp.messages) == 3

    after = scrape(relay)
    subject = api.SEND_EMAIL_SUBJECT

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("emailrelay_requests_total", subject=subject, outcome="ok") == 3
    assert moved("emailrelay_request_seconds_count", subject=subject) == 3
    assert moved("emailrelay_smtp_replies_total", result="ok", transport="smtp") == 3
    assert moved("emailrelay_smtp_send_seconds_count", transport="smtp") == 3
    assert value(after, "emailrelay_smtp_connections", transport="smtp") >= 1
    assert value(after, "emailrelay_requests_in_flight") == 0


def test_error_replies_are_counted_by_their_contract_error(
    relay: RelayProcess, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    before = scrape(relay)

    nats_client.request(api.SEND_EMAIL_SUBJECT, b"not json")
    nats_client.request(api.SEND_EMAIL_SUBJECT, {"to": "someone@example.com"})
    smtp.fail_next_data(554)
    assert nats_client.request_json(api.SEND_EMAIL_SUBJECT, email()) == {
        "error": api.ERR_DELIVERY_FAILED
    }

    after = scrape(relay)
    subject = api.SEND_EMAIL_SUBJECT

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for outcome in (api.ERR_INVALID_PAYLOAD, api.ERR_SEND_FIELDS_REQUIRED, api.ERR_DELIVERY_FAILED):
        assert moved("emailrelay_requests_total", subject=subject, outcome=outcome) == 1, outcome
    assert moved("emailrelay_requests_total", subject=subject, outcome="ok") == 0
    assert moved("emailrelay_smtp_replies_total", result="permanent", transport="smtp") == 1
    assert moved("emailrelay_smtp_replies_total", result="ok", transport="smtp") == 0
