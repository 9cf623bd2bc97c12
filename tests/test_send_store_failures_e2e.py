"""The send path's failure rules end to end (issue 11's rules that
test_send_idempotency_rules.py proves on fakes): relay subprocesses, a real
nats-server whose buckets the tests delete and re-create, the SMTP server
(which holds DATA for ``latency`` seconds), moto's SQS.

The module's relay runs with ``KV_AUTO_CREATE=false``, so a bucket deleted
here stays gone (the store is down for real) until the test puts it back;
:func:`restored_buckets` re-creates every bucket after each test.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from emailrelay import api
from emailrelay.app import IDEMPOTENCY_STALE_GRACE
from emailrelay.store import buckets
from emailrelay.store.idempotency import entry_key
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, relay_defaults, running_relay
from tests.support.servers.smtp import SmtpServer, tracked_email_ids
from tests.support.servers.sqs import SqsServer, relay_eventing_env
from tests.support.ses_events import bounce, sns_body
from tests.support.waiting import wait_until

BUCKETS = (buckets.RECIPIENTS, buckets.GROUP_INDEX, buckets.SUPPRESSIONS)
IDEMPOTENCY = buckets.idempotency_bucket(24 * 3600.0)
SUPPRESSION_CHECK_FAILURES = "emailrelay_suppression_check_failures_total"
LEFT_FOR_REDELIVERY = "event left for redelivery"


def create_buckets(client: SyncNats) -> None:
    """Every bucket the relay opens, as it would create them itself."""
    for spec in (*BUCKETS, IDEMPOTENCY):
        client.create_bucket(spec.name, max_value_size=spec.max_value_size, direct=True)


def bucket_exists(client: SyncNats, name: str) -> bool:
    async def exists() -> bool:
        try:
            await client.js.key_value(name)
        except Exception:  # nats-py raises BucketNotFoundError or a JetStream API error
            return False
        return True

    return client.run(exists())


@pytest.fixture(scope="module")
def events_queue(sqs_server: SqsServer) -> str:
    return sqs_server.create_queue(f"ses-events-{uuid.uuid4().hex[:8]}", visibility_timeout=1)


@pytest.fixture(scope="module")
def caller(module_nats_server: NatsServer) -> Iterator[SyncNats]:
    with SyncNats(module_nats_server.url) as client:
        create_buckets(client)
        yield client


@pytest.fixture(scope="module")
def relay(
    module_nats_server: NatsServer,
    smtp_server: SmtpServer,
    sqs_server: SqsServer,
    events_queue: str,
    caller: SyncNats,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RelayProcess]:
    """Suppression list and SES events on; a missing bucket stays missing."""
    env = {
        "KV_AUTO_CREATE": "false",
        "SUPPRESSION_ENABLED": "true",
        **relay_eventing_env(events_queue, sqs_server.endpoint_url, tmp_path_factory.mktemp("aws")),
    }
    with running_relay(module_nats_server, smtp_server, env) as process:
        yield process


def usable_again(caller: SyncNats, bucket: str) -> bool:
    """Whether the relay uses ``bucket`` again: it looks for a missing bucket at
    most once a second, so a bucket just re-created may not be seen yet."""
    if bucket == api.IDEMPOTENCY_BUCKET:
        return "email_id" in send(caller, new_key())
    if bucket == api.SUPPRESSIONS_BUCKET:
        reply = caller.request_json(api.SUPPRESSION_GET_SUBJECT, {"address": new_address()})
        return bool(reply == {"error": api.ERR_NOT_FOUND})
    return True


@pytest.fixture(autouse=True)
def restored_buckets(caller: SyncNats, relay: RelayProcess) -> Iterator[None]:
    """Re-create what a test deleted, and wait until the relay uses it again."""
    yield
    for spec in (*BUCKETS, IDEMPOTENCY):
        if not bucket_exists(caller, spec.name):
            caller.create_bucket(spec.name, max_value_size=spec.max_value_size, direct=True)
            wait_until(
                lambda: usable_again(caller, spec.name),  # noqa: B023 - called at once
                timeout=15,
                interval=0.2,
                message=f"the relay did not use {spec.name} again",
            )


def new_key() -> str:
    return f"order-{uuid.uuid4()}"


def new_address() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.org"


def send(caller: SyncNats, key: str = "", timeout: float = 10.0, **changes: Any) -> Any:
    body = send_request(**changes)
    if key:
        body["idempotency_key"] = key
    return caller.request_json(api.SEND_EMAIL_SUBJECT, body, timeout=timeout)


def deadline_in(seconds: float) -> dict[str, str]:
    return {api.DEADLINE_HEADER: str(int((time.time() + seconds) * 1000))}


def reserved(caller: SyncNats, key: str) -> bool:
    return caller.kv_get(api.IDEMPOTENCY_BUCKET, entry_key(key)) is not None


# --- the idempotency store down ---------------------------------------------------------


def test_keyed_send_while_the_idempotency_bucket_is_gone_fails_unsent(
    caller: SyncNats, smtp: SmtpServer
) -> None:
    caller.delete_bucket(api.IDEMPOTENCY_BUCKET)
    assert send(caller, new_key()) == {"error": api.ERR_DELIVERY_FAILED}
    assert smtp.mail_times == []


def test_send_without_a_key_while_the_idempotency_bucket_is_gone_goes_out(
    caller: SyncNats, smtp: SmtpServer
) -> None:
    caller.delete_bucket(api.IDEMPOTENCY_BUCKET)
    reply = send(caller)
    assert tracked_email_ids(smtp.wait_for_messages(1)) == [reply["email_id"]]


# --- the caller's deadline ---------------------------------------------------------------


def test_key_still_in_progress_at_the_callers_deadline_answers_delivery_failed(
    caller: SyncNats, smtp: SmtpServer
) -> None:
    smtp.latency = 4.0
    key = new_key()
    body = {**send_request(), "idempotency_key": key}
    with pytest.raises(nats.errors.TimeoutError):
        caller.request_json(api.SEND_EMAIL_SUBJECT, body, timeout=0.2)
    smtp.wait_for_data(1)  # the first request holds the key, mid-DATA
    waited = caller.request_json(api.SEND_EMAIL_SUBJECT, body, timeout=10, headers=deadline_in(1.0))
    assert waited == {"error": api.ERR_DELIVERY_FAILED}
    assert smtp.messages == []  # answered while the first send was still in DATA
    first = send(caller, key)  # waits for the first send's outcome
    assert tracked_email_ids(smtp.messages) == [first["email_id"]]


def test_request_past_its_deadline_does_not_reserve_the_key(
    caller: SyncNats, smtp: SmtpServer
) -> None:
    key = new_key()
    body = {**send_request(), "idempotency_key": key}
    late = caller.request_json(api.SEND_EMAIL_SUBJECT, body, headers=deadline_in(-5.0))
    assert late == {"error": api.ERR_DELIVERY_FAILED}
    assert not reserved(caller, key)
    assert "email_id" in send(caller, key)


# --- the suppression list ----------------------------------------------------------------


def test_suppressed_request_does_not_reserve_the_key(caller: SyncNats, smtp: SmtpServer) -> None:
    address, key = new_address(), new_key()
    caller.request_json(api.SUPPRESSION_ADD_SUBJECT, {"address": address})
    assert send(caller, key, to=address) == {"error": api.ERR_RECIPIENT_SUPPRESSED}
    assert not reserved(caller, key)
    caller.request_json(api.SUPPRESSION_REMOVE_SUBJECT, {"address": address})
    assert "email_id" in send(caller, key, to=address)


def test_unreadable_suppression_list_lets_the_send_out_and_counts_the_failure(
    caller: SyncNats, smtp: SmtpServer, relay: RelayProcess
) -> None:
    before = relay.metric(SUPPRESSION_CHECK_FAILURES)
    caller.delete_bucket(api.SUPPRESSIONS_BUCKET)
    reply = send(caller)
    assert tracked_email_ids(smtp.wait_for_messages(1)) == [reply["email_id"]]
    assert relay.metric(SUPPRESSION_CHECK_FAILURES) == before + 1


def test_bounce_whose_suppression_cannot_be_written_stays_queued_until_it_can(
    caller: SyncNats, relay: RelayProcess, sqs_server: SqsServer, events_queue: str
) -> None:
    address = new_address()
    caller.delete_bucket(api.SUPPRESSIONS_BUCKET)
    left_before = relay.stderr().count(LEFT_FOR_REDELIVERY)
    sqs_server.send(events_queue, sns_body(bounce(address)))
    wait_until(
        lambda: relay.stderr().count(LEFT_FOR_REDELIVERY) >= left_before + 2,
        timeout=20,
        message="the bounce was not received again after its suppression failed",
    )
    assert sqs_server.queue_depth(events_queue) == 1
    spec = buckets.SUPPRESSIONS
    caller.create_bucket(spec.name, max_value_size=spec.max_value_size, direct=True)
    wait_until(
        lambda: "reason" in caller.request_json(api.SUPPRESSION_GET_SUBJECT, {"address": address}),
        timeout=20,
        message="the redelivered bounce did not suppress its recipient",
    )
    wait_until(lambda: sqs_server.queue_depth(events_queue) == 0, timeout=20)


# --- a relay killed mid-DATA ---------------------------------------------------------------

SHORT_SEND_TIMEOUT = 1.0


def test_key_of_a_relay_killed_mid_data_reads_as_outcome_unknown_after_the_stale_threshold(
    own_nats_server: NatsServer, smtp: SmtpServer, tmp_path: Path
) -> None:
    """The threshold is SEND_TIMEOUT + IDEMPOTENCY_STALE_GRACE after the key was
    reserved; until then a retry waits its own deadline and is told ``email
    delivery failed``; never is the email sent again."""
    env = {
        **relay_defaults(own_nats_server, smtp),
        "SEND_TIMEOUT": str(SHORT_SEND_TIMEOUT),
        "LOG_LEVEL": "info",
    }
    smtp.latency = 60.0  # DATA is never answered while the victim lives
    key = new_key()
    body = {**send_request(), "idempotency_key": key}
    with SyncNats(own_nats_server.url) as client:
        with RelayProcess(env) as victim:
            victim.wait_ready()
            with pytest.raises(nats.errors.TimeoutError):
                client.request_json(api.SEND_EMAIL_SUBJECT, body, timeout=0.2)
            [data_at] = smtp.wait_for_data(1)
            victim.terminate(signal.SIGKILL)
            victim.wait(timeout=10)
        smtp.latency = 0.0
        answers: list[tuple[float, Any]] = []

        def outcome_unknown() -> bool:
            reply = client.request_json(api.SEND_EMAIL_SUBJECT, body, timeout=10)
            answers.append((time.time(), reply))
            return bool(reply == {"error": api.ERR_DELIVERY_OUTCOME_UNKNOWN})

        with RelayProcess(env) as survivor:
            survivor.wait_ready()
            wait_until(outcome_unknown, timeout=SHORT_SEND_TIMEOUT + IDEMPOTENCY_STALE_GRACE + 30)
    unknown_at, _ = answers[-1]
    assert [reply for _, reply in answers[:-1]] == [{"error": api.ERR_DELIVERY_FAILED}] * (
        len(answers) - 1
    )
    assert unknown_at - data_at >= IDEMPOTENCY_STALE_GRACE
    assert len(smtp.data_times) == 1, "the key was sent again"
