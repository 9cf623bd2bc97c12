"""SES engagement events end to end: relay subprocesses, a real nats-server, moto's SQS over HTTP.

Events are AWS's documented examples (see test_engagement_events.py) carrying the
tracking header of an email the relay really sent; results are read from the KV
bucket and the SQS queue, never from the relay's internals. The SigV4 signature
the relay's requests carry is proven in test_sqs_client.py.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest

from emailrelay import api
from tests.conftest import RelayFactory
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, relay_defaults
from tests.support.servers.smtp import SmtpServer
from tests.support.servers.sqs import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    SqsServer,
    relay_aws_env,
    relay_eventing_env,
)
from tests.support.ses_events import EVENT_TYPES, SES_EXAMPLES, ses_event, sns_body
from tests.support.waiting import free_port, wait_until

REGION = "us-east-1"
MAX_RECEIVES = 2
SQS_EVENTS = "emailrelay_sqs_events_total"
EXAMPLE_SES_MESSAGE_ID = "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"


@pytest.fixture(scope="module")
def sqs_boto(sqs_server: SqsServer) -> Iterator[Any]:
    client = boto3.client(
        "sqs",
        region_name=REGION,
        endpoint_url=sqs_server.endpoint_url,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )
    yield client
    client.close()


def eventing_env(
    nats_url: str, smtp: SmtpServer, queue_url: str, endpoint_url: str, tmp: Path
) -> dict[str, str | None]:
    return {
        **relay_defaults(nats_url, smtp),
        **relay_eventing_env(
            queue_url, endpoint_url, tmp, max_receives=MAX_RECEIVES, region=REGION
        ),
    }


@pytest.fixture(scope="module")
def events_queue(sqs_server: SqsServer) -> str:
    return sqs_server.create_queue(f"ses-events-{uuid.uuid4().hex[:8]}", visibility_timeout=1)


@pytest.fixture(scope="module")
def relay_env_for_queue(
    nats_server: NatsServer,
    smtp_server: SmtpServer,
    sqs_server: SqsServer,
    events_queue: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str | None]:
    return eventing_env(
        nats_server.url,
        smtp_server,
        events_queue,
        sqs_server.endpoint_url,
        tmp_path_factory.mktemp("aws"),
    )


@pytest.fixture(scope="module")
def relay(relay_env_for_queue: dict[str, str | None]) -> Iterator[RelayProcess]:
    """One relay polling ``events_queue`` for the whole module."""
    with RelayProcess(relay_env_for_queue) as process:
        process.wait_ready()
        yield process


@pytest.fixture(autouse=True)
def queue_left_empty(request: pytest.FixtureRequest) -> Iterator[None]:
    """The module's tests share one queue: a test that leaves a message in it
    fails itself, not the test that happens to run next."""
    yield
    if "events_queue" in request.fixturenames and "relay" in request.fixturenames:
        sqs_server: SqsServer = request.getfixturevalue("sqs_server")
        wait_for_empty_queue(sqs_server, request.getfixturevalue("events_queue"))


# --- helpers ----------------------------------------------------------------------


def send_email(nats: SyncNats) -> str:
    reply = nats.request_json(
        api.SEND_EMAIL_SUBJECT,
        send_request(),
    )
    assert reply["email_id"], reply
    return str(reply["email_id"])


def stored_record(nats: SyncNats, email_id: str) -> dict[str, Any] | None:
    value = nats.kv_get(api.RECIPIENTS_BUCKET, email_id)
    return None if value is None else dict(json.loads(value))


def wait_for_record(
    nats: SyncNats, email_id: str, field: str, expected: Any, timeout: float = 15.0
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def holds() -> bool:
        found.clear()
        found.update(stored_record(nats, email_id) or {})
        return found.get(field) == expected

    wait_until(holds, timeout=timeout, message=f"{field} != {expected!r} in {found}")
    return found


def wait_for_empty_queue(sqs: SqsServer, queue_url: str, timeout: float = 15.0) -> None:
    wait_until(lambda: sqs.queue_depth(queue_url) == 0, timeout=timeout, message="queue not empty")


def log_entries(process: RelayProcess, message: str) -> list[dict[str, Any]]:
    """The relay's JSON log lines whose message starts with ``message``."""
    entries = []
    for line in process.stderr().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if str(entry.get("msg", "")).startswith(message):
                entries.append(entry)
    return entries


def log_time(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00"))


def event_for(example: str, email_id: str, **detail: Any) -> dict[str, Any]:
    event = ses_event(example, email_id=email_id)
    detail_key = {"DeliveryDelay": "deliveryDelay"}.get(example, example.lower())
    event.setdefault(detail_key, {}).update(detail)
    return event


# What each event type leaves in the record: (field, value).
EXPECTED_CHANGE: dict[str, tuple[str, Any]] = {
    "Send": ("ses_message_id", EXAMPLE_SES_MESSAGE_ID),
    "Delivery": ("delivered_at", "2016-10-19T23:21:04.133000Z"),
    "Open": ("last_opened_at", "2017-08-09T22:00:19.652000Z"),
    "Click": ("last_clicked_at", "2017-08-09T23:51:25.570000Z"),
    "Bounce": ("bounce_sub_type", "General"),
    "Complaint": ("complaint_feedback_type", "abuse"),
    "Reject": ("reject_reason", "Bad content"),
    "DeliveryDelay": ("delay_type", "TransientCommunicationFailure"),
}


# --- every type, both wrappings ---------------------------------------------------------


@pytest.mark.parametrize("wrapping", ["sns", "raw"])
@pytest.mark.parametrize("example", EVENT_TYPES)
def test_event_is_applied_to_the_record_of_a_real_send(
    relay: RelayProcess,
    nats_client: SyncNats,
    sqs_server: SqsServer,
    events_queue: str,
    example: str,
    wrapping: str,
) -> None:
    email_id = send_email(nats_client)
    event = ses_event(example, email_id=email_id)
    sqs_server.send(events_queue, sns_body(event) if wrapping == "sns" else json.dumps(event))

    field, value = EXPECTED_CHANGE[example]
    record = wait_for_record(nats_client, email_id, field, value)

    assert record["email_id"] == email_id
    if example in ("Bounce", "Complaint", "Reject"):
        assert record["failed"] is True
    if example == "Open":
        assert record["open_count"] == 1
    if example == "Click":
        assert record["click_count"] == 1


def test_identity_notification_bounce_is_applied(
    relay: RelayProcess, nats_client: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats_client)
    sqs_server.send(events_queue, sns_body(ses_event("notificationType:Bounce", email_id)))
    record = wait_for_record(nats_client, email_id, "failed", True)
    assert record["failed_at"] == "2016-01-27T14:59:38.237000Z"


# --- dedupe, ordering, first wins ---------------------------------------------------------


def test_replayed_sns_message_counts_once(
    relay: RelayProcess, nats_client: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats_client)
    body = sns_body(ses_event("Open", email_id=email_id), sns_message_id=str(uuid.uuid4()))
    sqs_server.send(events_queue, body)
    sqs_server.send(events_queue, body)

    wait_for_record(nats_client, email_id, "open_count", 1)
    wait_for_empty_queue(sqs_server, events_queue)
    record = stored_record(nats_client, email_id)
    assert record is not None
    assert record["open_count"] == 1
    assert len(record["opened_at_list"]) == 1


def test_opens_out_of_order_keep_the_latest_last_opened_at(
    relay: RelayProcess, nats_client: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats_client)
    late = event_for("Open", email_id, timestamp="2024-05-02T10:00:00Z")
    early = event_for("Open", email_id, timestamp="2024-05-01T10:00:00Z")
    sqs_server.send(events_queue, sns_body(late))
    wait_for_record(nats_client, email_id, "open_count", 1)
    sqs_server.send(events_queue, sns_body(early))

    record = wait_for_record(nats_client, email_id, "open_count", 2)
    assert record["last_opened_at"] == "2024-05-02T10:00:00Z"


def test_delivery_then_bounce_records_both(
    relay: RelayProcess, nats_client: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats_client)
    sqs_server.send(events_queue, sns_body(ses_event("Delivery", email_id)))
    wait_for_record(nats_client, email_id, "delivered", True)
    sqs_server.send(events_queue, sns_body(ses_event("Bounce", email_id)))

    record = wait_for_record(nats_client, email_id, "failed", True)
    assert record["delivered"] is True
    assert record["delivered_at"] == "2016-10-19T23:21:04.133000Z"
    assert record["failed_at"] == "2017-08-05T00:41:02.669000Z"


# --- poison and missing records --------------------------------------------------------


def test_poison_messages_are_deleted_and_do_not_block_the_queue(
    relay: RelayProcess, nats_client: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats_client)
    unknown = ses_event("Open", email_id)
    unknown["eventType"] = "Teleport"
    poison = [
        "this is not JSON",
        json.dumps({"Type": "Notification", "MessageId": "x"}),  # no Message
        sns_body(SES_EXAMPLES["Open"]),  # no tracking header
        sns_body(unknown),
        sns_body(ses_event("Rendering Failure", email_id)),
    ]
    retried_before = relay.metric_sum(SQS_EVENTS, outcome="retry")
    for body in poison:
        sqs_server.send(events_queue, body)
    sqs_server.send(events_queue, sns_body(ses_event("Open", email_id)))

    wait_for_record(nats_client, email_id, "open_count", 1)
    wait_for_empty_queue(sqs_server, events_queue)
    # Deleted at their first receive: none was left for redelivery (which would
    # also empty the queue, after SES_EVENT_MAX_RECEIVES receives).
    assert relay.metric_sum(SQS_EVENTS, outcome="retry") == retried_before


def test_event_for_a_missing_record_is_redelivered_then_deleted(
    relay: RelayProcess, sqs_server: SqsServer, events_queue: str
) -> None:
    missing = str(uuid.uuid4())
    sqs_server.send(events_queue, sns_body(ses_event("Open", missing)))

    def dropped() -> bool:
        return any(e.get("email_id") == missing for e in log_entries(relay, "event dropped"))

    wait_until(dropped, timeout=20, message=f"event for {missing} not dropped\n{relay.logs()}")
    retries = [
        e for e in log_entries(relay, "event left for redelivery") if e.get("email_id") == missing
    ]
    assert [e["receive_count"] for e in retries] == list(range(1, MAX_RECEIVES + 1))
    wait_for_empty_queue(sqs_server, events_queue)


def test_event_whose_record_appears_before_max_receives_is_applied(
    relay: RelayProcess, nats_client: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = str(uuid.uuid4())
    sqs_server.send(events_queue, sns_body(ses_event("Open", email_id)))
    wait_until(
        lambda: any(
            e.get("email_id") == email_id for e in log_entries(relay, "event left for redelivery")
        ),
        timeout=15,
        message="event was not left for redelivery",
    )
    late_record = api.TrackingRecord(
        group_id="late",
        email_id=email_id,
        to="someone@example.com",
        subject="hi",
        sent_at=datetime.now(UTC),
    )
    nats_client.kv_put(api.RECIPIENTS_BUCKET, email_id, late_record.to_json())

    wait_for_record(nats_client, email_id, "open_count", 1)
    wait_for_empty_queue(sqs_server, events_queue)


# --- concurrency across processes -------------------------------------------------------


def test_200_opens_of_one_email_from_two_relays_are_all_counted(
    relay: RelayProcess,
    relay_env_for_queue: dict[str, str | None],
    relay_factory: RelayFactory,
    nats_client: SyncNats,
    sqs_server: SqsServer,
    sqs_boto: Any,
    events_queue: str,
) -> None:
    second = relay_factory(relay_env_for_queue)
    email_id = send_email(nats_client)
    bodies = [sns_body(ses_event("Open", email_id)) for _ in range(200)]
    for start in range(0, len(bodies), 10):
        entries = [
            {"Id": str(n), "MessageBody": body} for n, body in enumerate(bodies[start : start + 10])
        ]
        sqs_boto.send_message_batch(QueueUrl=events_queue, Entries=entries)

    record = wait_for_record(nats_client, email_id, "open_count", 200, timeout=60)
    # The list keeps the newest OPENS_KEPT distinct opens; the count stays exact.
    assert len({o["event_id"] for o in record["opened_at_list"]}) == api.OPENS_KEPT
    wait_for_empty_queue(sqs_server, events_queue)
    for process in (relay, second):
        applied = [
            e for e in log_entries(process, "SES event applied") if e.get("email_id") == email_id
        ]
        assert applied, f"relay {process.pid} applied none of the events"


# --- failures ----------------------------------------------------------------------------


def test_store_down_leaves_the_event_queued_and_applies_it_after_recovery(
    smtp_server: SmtpServer,
    sqs_server: SqsServer,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    queue = sqs_server.create_queue(f"store-down-{uuid.uuid4().hex[:8]}", visibility_timeout=1)
    with NatsServer() as nats_server, SyncNats(nats_server.url) as nats:
        relay = relay_factory(
            eventing_env(nats_server.url, smtp_server, queue, sqs_server.endpoint_url, tmp_path)
        )
        email_id = send_email(nats)

        nats_server.stop()
        sqs_server.send(queue, sns_body(ses_event("Open", email_id)))

        def retried_twice() -> bool:
            failed = log_entries(relay, "event left for redelivery: the store failed")
            return len([e for e in failed if e.get("email_id") == email_id]) >= 2

        wait_until(retried_twice, timeout=40, message=f"no store retries\n{relay.logs()}")
        assert sqs_server.queue_depth(queue) == 1

        nats_server.start()
        wait_for_record(nats, email_id, "open_count", 1, timeout=40)
        wait_for_empty_queue(sqs_server, queue)
        assert relay.returncode is None


def test_closed_sqs_endpoint_stops_the_relay_after_three_failures_with_backoff(
    relay_factory: RelayFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    env = {
        "SES_EVENTING_ENABLED": "true",
        "SES_ENGAGEMENT_SQS_QUEUE_URL": f"{closed}/123456789012/ses-events",
        **relay_aws_env(closed, tmp_path, REGION),
    }
    relay = relay_factory(env, wait_ready=False)

    code = relay.wait(timeout=60)

    assert code != 0, relay.logs()
    retries = log_entries(relay, "SQS receive failed; retrying")
    abort = log_entries(relay, "SQS receive failed 3 times in a row")
    assert [e["failures"] for e in retries] == [1, 2], relay.logs()
    assert len(abort) == 1
    times = [log_time(e) for e in (*retries, *abort)]
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]
    assert gaps[0] >= 0.5, gaps
    assert gaps[1] >= 1.0, gaps
    # The rest of the task group stopped: the request loop drained, then the process ended.
    assert log_entries(relay, "stopped serving requests")
    assert log_entries(relay, "stopped after a fatal failure")[0]["part"] == "sqs poller"


def test_eventing_without_the_kv_store_exits_at_once(
    relay_factory: RelayFactory, sqs_server: SqsServer, tmp_path: Path
) -> None:
    with NatsServer(jetstream=False) as plain_nats:
        env = {
            "NATS_URL": plain_nats.url,
            "SES_EVENTING_ENABLED": "true",
            "SES_ENGAGEMENT_SQS_QUEUE_URL": f"{sqs_server.endpoint_url}/123456789012/q",
            **relay_aws_env(sqs_server.endpoint_url, tmp_path, REGION),
        }
        relay = relay_factory(env, wait_ready=False)
        code = relay.wait(timeout=30)
    assert code != 0
    assert "SES_EVENTING_ENABLED is true but the KV store is not available" in relay.stderr()


def test_eventing_without_a_queue_url_exits_at_once(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    relay = relay_factory(
        {"SES_EVENTING_ENABLED": "true", "SES_ENGAGEMENT_SQS_QUEUE_URL": ""}, wait_ready=False
    )
    assert relay.wait(timeout=20) != 0
    assert "SES_ENGAGEMENT_SQS_QUEUE_URL" in relay.stderr()
