"""The EMAIL_EVENTS stream end to end: relay subprocesses with EVENTS_STREAM_ENABLED=true,
a real nats-server, moto's SQS over HTTP, the aiosmtpd SMTP server.

Emails are really sent; SES events are AWS's documented examples carrying the
sent email's tracking header and an SES message id of its own (SES gives each
message one). What is asserted is what nats-server's stream holds, read by
sequence (tests/support/event_stream.py), never the relay's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from emailrelay import api
from emailrelay.client import EmailRelayClient
from tests.support.event_stream import events_of, stream_messages, wait_for_event
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, relay_defaults, run_relay_once
from tests.support.servers.smtp import SmtpServer
from tests.support.servers.sqs import SqsServer, relay_aws_env
from tests.support.ses_events import ses_event, sns_body
from tests.support.waiting import wait_until

RECIPIENT = "recipient@example.com"
TO = f"Pat Example <{RECIPIENT}>"

# SES example -> (stream type, the fields beyond the common ones, as published).
EXPECTED: dict[str, tuple[str, dict[str, Any]]] = {
    "Delivery": ("delivered", {"occurred_at": "2016-10-19T23:21:04.133000Z"}),
    "Open": ("opened", {"occurred_at": "2017-08-09T22:00:19.652000Z"}),
    "Click": (
        "clicked",
        {
            "occurred_at": "2017-08-09T23:51:25.570000Z",
            "link": "http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html",
        },
    ),
    "Bounce": (
        "bounced",
        {
            "occurred_at": "2017-08-05T00:41:02.669000Z",
            "bounce_type": "Permanent",
            "bounce_sub_type": "General",
        },
    ),
    "Complaint": (
        "complained",
        {"occurred_at": "2017-08-05T00:41:02.669000Z", "complaint_feedback_type": "abuse"},
    ),
    "DeliveryDelay": ("delayed", {"occurred_at": "2020-06-16T00:25:40.095000Z"}),
    "Reject": ("rejected", {}),  # SES gives no time: the relay's time of processing
}


@pytest.fixture(scope="module")
def events_queue(sqs_server: SqsServer) -> str:
    return sqs_server.create_queue(f"ses-stream-{uuid.uuid4().hex[:8]}", visibility_timeout=1)


@pytest.fixture(scope="module")
def stream_env(
    module_nats_server: NatsServer,
    smtp_server: SmtpServer,
    sqs_server: SqsServer,
    events_queue: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str | None]:
    return {
        **relay_defaults(module_nats_server, smtp_server),
        "EVENTS_STREAM_ENABLED": "true",
        "SES_EVENTING_ENABLED": "true",
        "SES_ENGAGEMENT_SQS_QUEUE_URL": events_queue,
        **relay_aws_env(sqs_server.endpoint_url, tmp_path_factory.mktemp("aws")),
    }


@pytest.fixture(scope="module")
def relay(stream_env: dict[str, str | None]) -> Iterator[RelayProcess]:
    with RelayProcess(stream_env) as process:
        process.wait_ready()
        yield process


@pytest.fixture(scope="module")
def nats(module_nats_client: SyncNats) -> SyncNats:
    return module_nats_client


def send_email(nats: SyncNats, **changes: Any) -> str:
    reply = nats.request_json(api.SEND_EMAIL_SUBJECT, send_request(to=TO, **changes))
    assert reply["email_id"], reply
    return str(reply["email_id"])


def ses_message_id(email_id: str) -> str:
    return f"ses-{email_id}"


def event_for(example: str, email_id: str) -> dict[str, Any]:
    """The documented example as SES would send it for this email."""
    event = ses_event(example, email_id=email_id)
    event["mail"]["messageId"] = ses_message_id(email_id)
    return event


def published(relay: RelayProcess, event_type: str, outcome: str) -> float:
    return relay.metric(
        "emailrelay_stream_events_published_total", type=event_type, outcome=outcome
    )


def without_event_id(event: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in event.items() if name != "event_id"}


# --- every type, with the documented fields -----------------------------------------------


def test_sent_event_is_published_once_with_its_fields(relay: RelayProcess, nats: SyncNats) -> None:
    email_id = send_email(nats, group_id="stream-sent")
    event = wait_for_event(nats, email_id, "sent")
    record = json.loads(nats.kv_get(api.RECIPIENTS_BUCKET, email_id) or b"{}")
    assert event == {
        "event_id": f"sent:{email_id}",
        "type": "sent",
        "email_id": email_id,
        "group_id": "stream-sent",
        "recipient": RECIPIENT,
        "occurred_at": record["sent_at"],
    }
    assert [e["type"] for e in events_of(nats, email_id)] == ["sent"]


@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_ses_event_is_published_once_with_its_fields(
    relay: RelayProcess, nats: SyncNats, sqs_server: SqsServer, events_queue: str, example: str
) -> None:
    email_id = send_email(nats, group_id=f"stream-{example}")
    before = datetime.now(UTC)
    sqs_server.send(events_queue, sns_body(event_for(example, email_id)))

    event_type, fields = EXPECTED[example]
    event = wait_for_event(nats, email_id, event_type)
    if example == "Reject":
        occurred = datetime.fromisoformat(event.pop("occurred_at").replace("Z", "+00:00"))
        assert before <= occurred <= datetime.now(UTC)
    assert event["event_id"].startswith(f"{event_type}:")
    assert without_event_id(event) == {
        "type": event_type,
        "email_id": email_id,
        "group_id": f"stream-{example}",
        "recipient": RECIPIENT,
        "ses_message_id": ses_message_id(email_id),
        **fields,
    }
    assert sorted(e["type"] for e in events_of(nats, email_id)) == sorted(["sent", event_type])


def test_event_subject_names_its_type_and_the_message_id_header_its_event_id(
    relay: RelayProcess, nats: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats)
    sqs_server.send(events_queue, sns_body(event_for("Bounce", email_id)))
    wait_for_event(nats, email_id, "bounced")
    ours = [m for m in stream_messages(nats) if m[2]["email_id"] == email_id]
    assert sorted((subject, body["type"]) for subject, _, body in ours) == [
        ("lfx.email-service.events.bounced", "bounced"),
        ("lfx.email-service.events.sent", "sent"),
    ]
    assert all(headers[api.MSG_ID_HEADER] == body["event_id"] for _, headers, body in ours)


def test_ses_send_event_publishes_nothing(
    relay: RelayProcess, nats: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats)
    sqs_server.send(events_queue, sns_body(event_for("Send", email_id)))
    wait_until(
        lambda: json.loads(nats.kv_get(api.RECIPIENTS_BUCKET, email_id) or b"{}").get(
            "ses_message_id"
        ),
        timeout=20,
        message="the Send event was not applied",
    )
    assert [e["type"] for e in events_of(nats, email_id)] == ["sent"]


# --- exactly once ----------------------------------------------------------------------------


def test_one_event_delivered_three_times_is_one_stream_message(
    relay: RelayProcess, nats: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats)
    duplicates_before = published(relay, "opened", "duplicate")
    body = sns_body(event_for("Open", email_id))
    for _ in range(3):
        sqs_server.send(events_queue, body)
    wait_until(lambda: sqs_server.queue_depth(events_queue) == 0, timeout=20)
    assert [e["type"] for e in events_of(nats, email_id)].count("opened") == 1
    # Each delivery was published; the stream dropped the two copies.
    assert published(relay, "opened", "duplicate") - duplicates_before == 2


def test_one_event_in_three_sns_notifications_is_one_stream_message(
    relay: RelayProcess, nats: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats)
    event = event_for("Click", email_id)
    for _ in range(3):  # SNS retried: a new MessageId each time, the same SES event
        sqs_server.send(events_queue, sns_body(event, sns_message_id=str(uuid.uuid4())))
    wait_until(lambda: sqs_server.queue_depth(events_queue) == 0, timeout=20)
    assert [e["type"] for e in events_of(nats, email_id)].count("clicked") == 1


def test_two_opens_of_one_email_are_two_events(
    relay: RelayProcess, nats: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats)
    first, second = event_for("Open", email_id), event_for("Open", email_id)
    second["open"]["timestamp"] = "2017-08-10T08:00:00.000Z"
    sqs_server.send(events_queue, sns_body(first))
    sqs_server.send(events_queue, sns_body(second))
    wait_until(
        lambda: [e["type"] for e in events_of(nats, email_id)].count("opened") == 2, timeout=20
    )
    opened = [e for e in events_of(nats, email_id) if e["type"] == "opened"]
    assert opened[0]["event_id"] != opened[1]["event_id"]


def test_two_replicas_racing_on_one_event_publish_it_once(
    relay: RelayProcess,
    stream_env: dict[str, str | None],
    nats: SyncNats,
    sqs_server: SqsServer,
    events_queue: str,
) -> None:
    with RelayProcess(stream_env) as second:
        second.wait_ready()
        email_ids = [send_email(nats) for _ in range(3)]
        for email_id in email_ids:
            body = sns_body(event_for("Delivery", email_id))
            for _ in range(4):
                sqs_server.send(events_queue, body)
        wait_until(lambda: sqs_server.queue_depth(events_queue) == 0, timeout=30)
        handled_by_second = published(second, "delivered", "stored") + published(
            second, "delivered", "duplicate"
        )
    assert handled_by_second > 0, "the second replica took no part in the race"
    for email_id in email_ids:
        assert [e["type"] for e in events_of(nats, email_id)].count("delivered") == 1


# --- filtering, the client and the CLI ----------------------------------------------------------


def test_a_consumer_filtered_on_bounced_sees_only_bounces(
    relay: RelayProcess, nats: SyncNats, sqs_server: SqsServer, events_queue: str
) -> None:
    email_id = send_email(nats)
    for example in ("Delivery", "Bounce", "Complaint"):
        sqs_server.send(events_queue, sns_body(event_for(example, email_id)))
    wait_for_event(nats, email_id, "complained")
    wait_for_event(nats, email_id, "bounced")

    async def read_bounces() -> list[tuple[str, dict[str, Any]]]:
        js = nats.nc.jetstream()
        subscription = await js.pull_subscribe(
            api.events_subject("bounced"), durable=None, stream=api.EVENTS_STREAM
        )
        found = []
        try:
            while True:
                messages = await subscription.fetch(50, timeout=1)
                for msg in messages:
                    found.append((msg.subject, json.loads(msg.data)))
                    await msg.ack()
        except TimeoutError:
            return found
        finally:
            await subscription.unsubscribe()

    seen = nats.run(read_bounces())
    assert email_id in {body["email_id"] for _, body in seen}
    assert {(subject, body["type"]) for subject, body in seen} == {
        ("lfx.email-service.events.bounced", "bounced")
    }


# --- start-up ---------------------------------------------------------------------------------


def test_missing_stream_without_auto_create_stops_the_start_with_one_line(
    own_nats_server: NatsServer, smtp_server: SmtpServer
) -> None:
    env = {
        **relay_defaults(own_nats_server, smtp_server),
        "EVENTS_STREAM_ENABLED": "true",
        "KV_AUTO_CREATE": "false",
        "LOG_FORMAT": "text",
    }
    code, _, stderr = run_relay_once(env, timeout=60)
    assert code == 1
    lines = [line for line in stderr.splitlines() if "EMAIL_EVENTS" in line]
    assert len(lines) == 1, stderr
    assert "KV_AUTO_CREATE=true" in lines[0]


def test_relay_creates_the_stream_with_the_deployment_settings(
    own_nats_server: NatsServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    env = {
        **relay_defaults(own_nats_server, smtp_server),
        "EVENTS_STREAM_ENABLED": "true",
        "EVENTS_MAX_AGE": "1h",
        "EVENTS_MAX_BYTES": "1048576",
        "EVENTS_DUPLICATE_WINDOW": "3m",
    }
    with RelayProcess(env) as process, SyncNats(own_nats_server.url) as client:
        process.wait_ready()
        info = client.run(client.nc.jetstream().stream_info(api.EVENTS_STREAM))
    config = info.config
    assert config.subjects == ["lfx.email-service.events.>"]
    assert (str(config.storage), str(config.discard)) == ("file", "old")
    assert config.num_replicas == 1
    assert (config.max_age, config.max_bytes, config.duplicate_window) == (3600, 1048576, 180)


# --- a NATS outage ------------------------------------------------------------------------------


def tracking_id_of(smtp: SmtpServer, index: int) -> str:
    """The email id in the ``index``-th received message's X-LFX-TRACKING-ID."""
    value = str(smtp.messages[index].parsed[api.TRACKING_HEADER])
    return value.rpartition("/")[2]


def test_sent_event_of_a_send_during_a_nats_outage_is_published_once_afterwards(
    own_nats_server: NatsServer, smtp: SmtpServer
) -> None:
    env = {**relay_defaults(own_nats_server, smtp), "EVENTS_STREAM_ENABLED": "true"}
    with RelayProcess(env) as process, SyncNats(own_nats_server.url) as client:
        process.wait_ready()
        smtp.latency = 2.0  # the DATA reply comes while NATS is down
        client.publish(api.SEND_EMAIL_SUBJECT, send_request(to=TO))
        wait_until(lambda: len(smtp.mail_times) == 1, timeout=20, message="no SMTP transaction")
        own_nats_server.stop()
        wait_until(
            lambda: "sent event pending" in process.stderr(),
            timeout=30,
            message="the sent event was not left to the pending writes",
        )
        own_nats_server.start()
        email_id = tracking_id_of(smtp, 0)
        wait_for_event(client, email_id, "sent", timeout=30)
        wait_until(lambda: process.metric("emailrelay_stream_events_pending") == 0, timeout=30)
        assert [e["event_id"] for e in events_of(client, email_id)] == [f"sent:{email_id}"]


# --- the client's iterator and `emailrelay events` ------------------------------------------------


def bounced_email(nats: SyncNats, sqs_server: SqsServer, events_queue: str) -> str:
    """A sent email whose bounce is in the stream."""
    email_id = send_email(nats)
    sqs_server.send(events_queue, sns_body(event_for("Bounce", email_id)))
    wait_for_event(nats, email_id, "bounced")
    return email_id


async def read_events(
    url: str, consumer: str, types: Sequence[str] = (), *, take: int | None = None
) -> list[api.EmailEvent]:
    """Events through the client's iterator (no follow); the first ``take`` only."""
    found: list[api.EmailEvent] = []
    async with EmailRelayClient.connect(url) as client:
        events = client.events(consumer, types)
        async with contextlib.aclosing(events):
            async for event in events:
                found.append(event)
                if take is not None and len(found) == take:
                    break
    return found


async def test_client_iterator_reads_one_type_each_event_once(
    relay: RelayProcess,
    nats: SyncNats,
    sqs_server: SqsServer,
    events_queue: str,
    module_nats_server: NatsServer,
) -> None:
    email_id = bounced_email(nats, sqs_server, events_queue)
    consumer = f"test-{uuid.uuid4().hex[:8]}"
    first = await read_events(module_nats_server.url, consumer, ["bounced"])
    again = await read_events(module_nats_server.url, consumer, ["bounced"])
    assert email_id in {event.email_id for event in first}
    assert {event.type for event in first} == {"bounced"}
    assert again == []  # acknowledged as it went: the durable consumer resumes after them


async def test_client_iterator_left_early_reads_the_event_in_hand_again(
    relay: RelayProcess,
    nats: SyncNats,
    sqs_server: SqsServer,
    events_queue: str,
    module_nats_server: NatsServer,
) -> None:
    bounced_email(nats, sqs_server, events_queue)
    bounced_email(nats, sqs_server, events_queue)
    consumer = f"test-{uuid.uuid4().hex[:8]}"
    (in_hand,) = await read_events(module_nats_server.url, consumer, ["bounced"], take=1)
    rest = await read_events(module_nats_server.url, consumer, ["bounced"])
    assert rest[0].event_id == in_hand.event_id
    assert len({event.event_id for event in rest}) == len(rest) >= 2


def test_client_iterator_follows_new_events_on_asyncio(
    relay: RelayProcess, module_nats_server: NatsServer
) -> None:
    async def main() -> tuple[str, api.EmailEvent]:
        async with EmailRelayClient.connect(module_nats_server.url) as client:
            events = client.events(f"test-{uuid.uuid4().hex[:8]}", ["sent"], follow=True)
            async with contextlib.aclosing(events):
                sent = await client.send(**send_request(to=TO))
                async for event in events:
                    if event.email_id == sent.email_id:
                        return sent.email_id, event
        raise AssertionError("the iterator ended while following")

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        email_id, event = runner.run(asyncio.wait_for(main(), 60))
    assert (event.type, event.event_id, event.recipient) == ("sent", f"sent:{email_id}", RECIPIENT)


def emailrelay_cli(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    return subprocess.Popen(
        [sys.executable, "-m", "emailrelay", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_events_prints_the_requested_type_and_exits_0_once_caught_up(
    relay: RelayProcess,
    nats: SyncNats,
    sqs_server: SqsServer,
    events_queue: str,
    module_nats_server: NatsServer,
) -> None:
    email_id = bounced_email(nats, sqs_server, events_queue)
    consumer = f"test-{uuid.uuid4().hex[:8]}"
    cli = emailrelay_cli(
        "events", "--type", "bounced", "--json", "--consumer", consumer,
        "--server", module_nats_server.url,
    )  # fmt: skip
    stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 0, stderr
    printed = [json.loads(line) for line in stdout.splitlines()]
    assert email_id in {event["email_id"] for event in printed}
    assert {event["type"] for event in printed} == {"bounced"}


def test_cli_events_follow_prints_a_new_event_as_it_comes(
    relay: RelayProcess, nats: SyncNats, module_nats_server: NatsServer
) -> None:
    cli = emailrelay_cli(
        "events", "--follow", "--type", "sent", "--consumer", f"test-{uuid.uuid4().hex[:8]}",
        "--server", module_nats_server.url,
    )  # fmt: skip
    try:
        email_id = send_email(nats)
        assert cli.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = cli.stdout.readline()
            if email_id in line:
                break
        else:
            raise AssertionError("the followed event was not printed")
        assert " sent " in line
        assert RECIPIENT in line
    finally:
        cli.send_signal(signal.SIGINT)
        cli.communicate(timeout=30)
    assert cli.returncode == 0


def test_a_stream_deleted_while_running_is_created_again_by_the_next_event(
    own_nats_server: NatsServer, smtp: SmtpServer
) -> None:
    env = {**relay_defaults(own_nats_server, smtp), "EVENTS_STREAM_ENABLED": "true"}
    with RelayProcess(env) as process, SyncNats(own_nats_server.url) as client:
        process.wait_ready()
        client.run(client.nc.jetstream().delete_stream(api.EVENTS_STREAM))
        reply = client.request_json(api.SEND_EMAIL_SUBJECT, send_request(to=TO))
        event = wait_for_event(client, reply["email_id"], "sent")
    assert event["event_id"] == f"sent:{reply['email_id']}"


def test_an_event_the_stream_did_not_take_stays_in_sqs_until_it_does(
    own_nats_server: NatsServer,
    smtp: SmtpServer,
    sqs_server: SqsServer,
    tmp_path: Path,
) -> None:
    queue = sqs_server.create_queue(f"ses-retry-{uuid.uuid4().hex[:8]}", visibility_timeout=1)
    env = {
        **relay_defaults(own_nats_server, smtp),
        "EVENTS_STREAM_ENABLED": "true",
        "SES_EVENTING_ENABLED": "true",
        "SES_ENGAGEMENT_SQS_QUEUE_URL": queue,
        **relay_aws_env(sqs_server.endpoint_url, tmp_path),
    }
    with RelayProcess(env) as creator:  # makes the buckets and the stream
        creator.wait_ready()
    with (
        RelayProcess({**env, "KV_AUTO_CREATE": "false"}) as process,
        SyncNats(own_nats_server.url) as client,
    ):
        process.wait_ready()
        js = client.nc.jetstream()
        config = client.run(js.stream_info(api.EVENTS_STREAM)).config
        email_id = send_email(client)
        client.run(js.delete_stream(api.EVENTS_STREAM))
        sqs_server.send(queue, sns_body(event_for("Bounce", email_id)))
        wait_until(
            lambda: (
                process.metric("emailrelay_stream_event_publish_failures_total", type="bounced")
                >= 2
            ),
            timeout=30,
            message="the bounce was not tried (and redelivered) while the stream was gone",
        )
        assert sqs_server.queue_depth(queue) == 1
        client.run(js.add_stream(config))
        wait_for_event(client, email_id, "bounced", timeout=30)
        wait_until(lambda: sqs_server.queue_depth(queue) == 0, timeout=30)
        assert [e["type"] for e in events_of(client, email_id)] == ["bounced"]
