"""Tracking that outlives an outage and buckets that come back, end to end:
``emailrelay serve`` against a nats-server of each test's own, stopped and
restarted on the same port and store, or with a bucket deleted under it.

Send latencies during a bucket's absence are measured and printed (run with
``-s`` to see them), never asserted.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest

from emailrelay import api
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer
from tests.support.tracking_calls import analytics, send, status, unique_group
from tests.support.waiting import wait_until


@pytest.fixture
def client(own_nats_server: NatsServer) -> Iterator[SyncNats]:
    with SyncNats(own_nats_server.url) as client:
        yield client


def group_index(client: SyncNats, group_id: str) -> list[str]:
    value = client.kv_get(api.GROUP_INDEX_BUCKET, group_id)
    return [] if value is None else list(json.loads(value))


def tracking_ids(smtp: SmtpServer) -> list[tuple[str, str]]:
    """(group id, email id) of every message the SMTP server received."""
    return [tracking for message in smtp.messages if (tracking := message.tracking()) is not None]


def timed_sends(client: SyncNats, group_id: str, count: int) -> list[float]:
    """Send ``count`` emails one after another; each one's latency in seconds."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        send(client, group_id=group_id)
        latencies.append(time.perf_counter() - started)
    return latencies


def report(label: str, latencies: list[float]) -> None:
    ms = sorted(1000 * s for s in latencies)
    print(
        f"\n{label}: {len(ms)} sends, median {statistics.median(ms):.1f} ms, "
        f"max {ms[-1]:.1f} ms, first {1000 * latencies[0]:.1f} ms"
    )


THROUGHPUT_SENDS = 100


def report_throughput(label: str, client: SyncNats, group_id: str) -> None:
    """Send THROUGHPUT_SENDS emails, 16 in flight; print the rate."""
    started = time.perf_counter()
    replies = client.request_many(
        api.SEND_EMAIL_SUBJECT,
        [send_request(group_id=group_id) for _ in range(THROUGHPUT_SENDS)],
        concurrency=16,
    )
    elapsed = time.perf_counter() - started
    assert all(reply.get("email_id") for reply in replies), replies
    print(f"\n{label}: {THROUGHPUT_SENDS / elapsed:.1f} sends/s (16 in flight)")


def bucket_exists(client: SyncNats, bucket: str) -> bool:
    async def go() -> bool:
        return any(info.config.name == f"KV_{bucket}" for info in await client.js.streams_info())

    return client.run(go())


def declare_buckets(client: SyncNats) -> None:
    client.create_bucket(api.RECIPIENTS_BUCKET, max_value_size=64 * 1024, direct=True)
    client.create_bucket(api.GROUP_INDEX_BUCKET, direct=True)


# --- buckets that come back --------------------------------------------------


def test_group_index_deleted_while_running_is_recreated_and_every_send_indexed(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    with running_relay(own_nats_server, smtp):
        group_id = unique_group()
        report("before the deletion", timed_sends(client, group_id, 20))
        client.delete_bucket(api.GROUP_INDEX_BUCKET)
        gap = unique_group("gap")
        latencies = timed_sends(client, gap, 20)
        report("group index deleted, KV_AUTO_CREATE=true", latencies)
        assert bucket_exists(client, api.GROUP_INDEX_BUCKET)
        assert len(group_index(client, gap)) == 20
        client.delete_bucket(api.GROUP_INDEX_BUCKET)
        report_throughput("group index deleted again, KV_AUTO_CREATE=true", client, gap)
        wait_until(
            lambda: len(group_index(client, gap)) == THROUGHPUT_SENDS,
            message="the sends after the second deletion were not all indexed",
        )


def test_records_bucket_deleted_while_running_is_recreated_and_the_record_stored(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    with running_relay(own_nats_server, smtp):
        send(client)
        client.delete_bucket(api.RECIPIENTS_BUCKET)
        sent = send(client)
        assert status(client, email_id=sent["email_id"])["email_id"] == sent["email_id"]


def test_recreated_bucket_has_the_deployments_settings(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    with running_relay(own_nats_server, smtp):
        client.delete_bucket(api.RECIPIENTS_BUCKET)
        send(client)

        async def config() -> Any:
            return (await client.js.stream_info(f"KV_{api.RECIPIENTS_BUCKET}")).config

        recreated = client.run(config())
        assert (recreated.max_msg_size, recreated.max_msgs_per_subject) == (64 * 1024, 1)
        assert recreated.allow_direct


def test_status_by_group_recovers_after_the_group_index_is_deleted(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    with running_relay(own_nats_server, smtp):
        group_id = unique_group()
        send(client, group_id=group_id)
        client.delete_bucket(api.GROUP_INDEX_BUCKET)
        assert status(client, group_id=group_id) == {"error": api.ERR_NOT_FOUND}
        sent = send(client, group_id=group_id)
        assert [r["email_id"] for r in status(client, group_id=group_id)] == [sent["email_id"]]


def test_analytics_recover_after_the_group_index_is_deleted(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    with running_relay(own_nats_server, smtp):
        group_id = unique_group()
        send(client, group_id=group_id)
        client.delete_bucket(api.GROUP_INDEX_BUCKET)
        assert analytics(client, group_id=group_id) == {"error": api.ERR_NOT_FOUND}
        send(client, group_id=group_id)
        assert analytics(client, group_id=group_id)["total_sent"] == 1


def test_without_auto_create_sends_stay_fast_and_are_indexed_once_the_bucket_is_back(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    declare_buckets(client)
    with running_relay(own_nats_server, smtp, {"KV_AUTO_CREATE": "false"}) as relay:
        report_throughput("before the deletion", client, unique_group())
        client.delete_bucket(api.GROUP_INDEX_BUCKET)
        group_id = unique_group("gap")
        latencies = timed_sends(client, group_id, 20)
        report("group index deleted, KV_AUTO_CREATE=false", latencies)
        report_throughput("group index deleted, KV_AUTO_CREATE=false", client, group_id)
        assert relay.metric("emailrelay_tracking_pending") == 20 + THROUGHPUT_SENDS
        client.create_bucket(api.GROUP_INDEX_BUCKET, direct=True)
        wait_until(
            lambda: len(group_index(client, group_id)) == 20 + THROUGHPUT_SENDS,
            timeout=20,
            message=f"pending index entries did not land\n{relay.logs()}",
        )


# --- tracking that outlives an outage ------------------------------------------


def test_nats_outage_longer_than_the_tracking_wait_loses_no_record(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    server, count = own_nats_server, 10
    smtp.latency = 3.0  # the sends are still with the provider when NATS goes
    group_id = unique_group("outage")
    with running_relay(server, smtp) as relay:
        # Down until every tracking write has given up its in-request wait
        # (TRACKING_WAIT, 1 s) and gone to the pending queue.
        stop_with_sends_in_flight(server, client, relay, group_id, count)
        server.start()
        restarted = time.perf_counter()
        sent = tracking_ids(smtp)
        assert len(sent) == count
        with SyncNats(server.url) as after:

            def all_stored() -> bool:
                index = set(group_index(after, group_id))
                return all(
                    after.kv_get(api.RECIPIENTS_BUCKET, email_id) is not None and email_id in index
                    for _, email_id in sent
                )

            wait_until(all_stored, timeout=30, message=f"records missing\n{relay.logs()}")
            took = time.perf_counter() - restarted
            print(f"\n{count} pending writes stored {took:.1f} s after the restart")
            assert sorted(r["email_id"] for r in status(after, group_id=group_id)) == sorted(
                email_id for _, email_id in sent
            )
        assert relay.metric("emailrelay_tracking_pending") == 0
        assert "KV bucket was missing" not in relay.stderr()  # an outage is not a deletion


def test_pending_writes_left_at_shutdown_are_logged_with_their_ids(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    smtp.latency = 2.0
    with running_relay(own_nats_server, smtp) as relay:
        stop_with_sends_in_flight(own_nats_server, client, relay, unique_group("lost"), 1)
        relay.terminate()
        relay.wait(timeout=30)
        [(_, email_id)] = tracking_ids(smtp)
        lost = [
            json.loads(line)
            for line in relay.stderr().splitlines()
            if "tracking writes lost at shutdown" in line
        ]
        assert [entry["email_ids"] for entry in lost] == [[email_id]]
        assert send_request()["to"] not in json.dumps(lost)


def stop_with_sends_in_flight(
    server: NatsServer, client: SyncNats, relay: RelayProcess, group_id: str, count: int
) -> None:
    """Publish ``count`` sends the SMTP server is slow to accept, stop NATS while
    they are with the provider, and wait until their tracking writes are pending."""
    for _ in range(count):
        client.publish(api.SEND_EMAIL_SUBJECT, send_request(group_id=group_id))
    wait_until(
        lambda: relay.metric("emailrelay_requests_in_flight") == count,
        message="the sends did not start",
    )
    server.stop()
    wait_until(
        lambda: relay.metric("emailrelay_tracking_pending") == count,
        timeout=30,
        message=f"the tracking writes were not handed to the pending queue\n{relay.logs()}",
    )


def all_tracked_once(server: NatsServer, smtp: SmtpServer, group_id: str) -> None:
    """Wait until every email the SMTP server received is recorded and indexed,
    and check that the index holds each id once."""
    sent = [email_id for _, email_id in tracking_ids(smtp)]
    with SyncNats(server.url) as after:

        def stored() -> bool:
            index = set(group_index(after, group_id))
            return all(
                e in index and after.kv_get(api.RECIPIENTS_BUCKET, e) is not None for e in sent
            )

        wait_until(stored, timeout=30, message="pending writes did not land")
        assert sorted(group_index(after, group_id)) == sorted(sent)


def failed_pending_attempts(relay: RelayProcess) -> int:
    return relay.stderr().count("pending tracking write failed")


def test_outage_longer_than_the_pending_retry_bound_loses_no_record(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    server, count = own_nats_server, 5
    smtp.latency = 2.0
    group_id = unique_group("long-outage")
    with running_relay(server, smtp) as relay:
        stop_with_sends_in_flight(server, client, relay, group_id, count)
        # Six failed passes: the backoff between them has reached its 5 s cap.
        wait_until(
            lambda: failed_pending_attempts(relay) >= 6,
            timeout=60,
            message=f"the pending writes stopped retrying\n{relay.logs()}",
        )
        server.start()
        all_tracked_once(server, smtp, group_id)
        assert relay.metric("emailrelay_tracking_pending") == 0


def test_second_outage_right_after_the_first_loses_no_record_and_indexes_each_once(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    server, count = own_nats_server, 10
    smtp.latency = 2.0
    group_id = unique_group("two-outages")
    with running_relay(server, smtp) as relay:
        stop_with_sends_in_flight(server, client, relay, group_id, count)
        server.start()
        relay.wait_ready()
        server.stop()  # while the queue drains, or before its next pass
        server.start()
        all_tracked_once(server, smtp, group_id)
        assert relay.metric("emailrelay_tracking_pending") == 0


def test_sigterm_while_pending_writes_hold_entries_stores_them_in_the_last_try(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    server, count = own_nats_server, 5
    smtp.latency = 2.0
    group_id = unique_group("sigterm")
    with running_relay(server, smtp) as relay:
        stop_with_sends_in_flight(server, client, relay, group_id, count)
        # Let the queue back off past its first tries, so it still holds
        # every entry when the store returns and the signal comes.
        wait_until(lambda: failed_pending_attempts(relay) >= 3, timeout=30)
        server.start()
        relay.terminate()
        assert relay.wait(timeout=30) == 0
        logs = relay.stderr()
        assert "pending tracking writes stored" not in logs  # not before the signal
        assert "tracking writes lost at shutdown" not in logs
    all_tracked_once(server, smtp, group_id)


def test_relay_started_before_the_buckets_open_tracks_its_sends_once_they_do(
    own_nats_server: NatsServer, client: SyncNats, smtp: SmtpServer
) -> None:
    group_id, count = unique_group("before-open"), 5
    with running_relay(own_nats_server, smtp, {"KV_AUTO_CREATE": "false"}) as relay:
        for _ in range(count):
            send(client, group_id=group_id)
        assert relay.metric("emailrelay_tracking_pending") == count
        declare_buckets(client)
        wait_until(
            lambda: len(group_index(client, group_id)) == count,
            timeout=60,
            message=f"the sends made before the buckets opened were not indexed\n{relay.logs()}",
        )
        for _, email_id in tracking_ids(smtp):
            assert client.kv_get(api.RECIPIENTS_BUCKET, email_id) is not None
        assert relay.metric("emailrelay_tracking_write_failures_total") == 0
