"""A three-node NATS cluster (routes on loopback, R3 buckets) losing the stream
leader, then the node a relay is connected to, under load."""

from __future__ import annotations

import time

import pytest

from tests.faults import figures
from tests.faults.audit import (
    assert_intact,
    audit_when_tracked,
    check_callers,
    delivered,
    record_load_figures,
)
from tests.faults.cluster import NatsCluster
from tests.faults.load import LoadGenerator, LoadResult, new_run, sends
from tests.faults.relays import running_relays
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.faults

RECORDS_STREAM = "KV_email-recipients"


def deliveries_since(smtp: SmtpServer, run: str, moment: float) -> int:
    return sum(d.received_at > moment for d in delivered(smtp, run))


def kill_and_restart(node: NatsServer, smtp: SmtpServer, run: str) -> tuple[float, float]:
    """Kill the node, let the load run on until 30 emails went out without it,
    then restart it and wait until it is healthy (caught up). (killed, restarted)."""
    node.kill()
    killed_at = time.time()
    wait_until(
        lambda: deliveries_since(smtp, run, killed_at) >= 30,
        timeout=60,
        message="the cluster did not carry on sending without the node",
    )
    node.start()
    return killed_at, time.time()


def record_stall(label: str, result: LoadResult, killed_at: float) -> None:
    first = result.first_success_after(killed_at)
    figures.record(f"{label}: first success sent after the kill", first or "none", "s")


def test_cluster_losing_the_stream_leader_and_a_relays_own_node_loses_nothing(
    fault_smtp: SmtpServer,
) -> None:
    run = new_run()
    fault_smtp.latency = 0.02
    with NatsCluster() as cluster:
        n1, n2, _ = cluster.nodes.values()
        with (
            running_relays([n1.url, n2.url], fault_smtp, {"KV_REPLICAS": "3"}) as relays,
            LoadGenerator(cluster.urls) as load,  # type: ignore[arg-type]
            SyncNats(cluster.urls) as kv,  # type: ignore[arg-type]
        ):
            # A fresh cluster may still be electing its JetStream leader when
            # the relays start; they then send untracked until the buckets
            # open (documented). The faults under test come later: start the
            # load once both relays track.
            wait_until(
                lambda: all("tracking on" in relay.stderr() for relay in relays),
                timeout=60,
                message="relays never turned tracking on",
            )
            running = load.start(sends(run, 900), concurrency=32, rate=30)
            wait_until(lambda: len(delivered(fault_smtp, run)) >= 60, timeout=30)

            leader = cluster.stream_leader(kv, RECORDS_STREAM)
            leader_killed, leader_back = kill_and_restart(cluster.nodes[leader], fault_smtp, run)
            for node in cluster.nodes.values():
                node.wait_healthy(timeout=60)
            new_leader = cluster.stream_leader(kv, RECORDS_STREAM)

            own_killed, own_back = kill_and_restart(n1, fault_smtp, run)  # relay-0's node
            for node in cluster.nodes.values():
                node.wait_healthy(timeout=60)

            result = running.result(timeout=180)
            load.settle()
            found = audit_when_tracked(fault_smtp, kv, run)

            figures.record("stream leader killed", f"{leader} (new leader {new_leader})")
            record_stall("stream leader", result, leader_killed)
            record_stall("relay-0's own node n1", result, own_killed)
            figures.record("leader node down for", leader_back - leader_killed, "s")
            figures.record("relay-0's node down for", own_back - own_killed, "s")
            record_load_figures(result, found)
            # No assertion on who leads afterwards: the killed leader is
            # restarted within seconds and may legitimately win the election
            # again (seen once on a loaded machine). What the fault must not
            # do is lose, duplicate or untrack an email.
            assert_intact(found, check_callers(result, found.delivered))
