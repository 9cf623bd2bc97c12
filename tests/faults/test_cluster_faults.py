"""A three-node NATS cluster (routes on loopback, R3 buckets) losing the stream
leader, then the node a relay is connected to, under load; and the same
cluster with callers of the replaced relay (no deadline header, 10 s
timeouts) through a leader kill -9 and a rolling restart, phase by phase."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from emailrelay import api
from tests.faults import figures
from tests.faults.audit import Delivered, delivered, group_index, has_record
from tests.faults.cluster import NatsCluster
from tests.faults.load import LoadResult, Request, percentile, sends
from tests.faults.scenario import Scenario, fault_scenario
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.faults

RECORDS_STREAM = "KV_email-recipients"


R3 = {"KV_REPLICAS": "3"}


def kill_and_restart(node: NatsServer, scene: Scenario) -> tuple[float, float]:
    """Kill the node, let the load run on until 30 emails went out without it,
    then restart it and wait until it is healthy (caught up). (killed, restarted)."""
    node.kill()
    killed_at = time.time()
    wait_until(
        lambda: sum(d.received_at > killed_at for d in scene.delivered()) >= 30,
        timeout=60,
        message="the cluster did not carry on sending without the node",
    )
    node.start()
    return killed_at, time.time()


def wait_until_tracking(relays: list[RelayProcess]) -> None:
    wait_until(
        lambda: all("tracking on" in relay.stderr() for relay in relays),
        timeout=60,
        message="relays never turned tracking on",
    )


def record_stall(label: str, result: LoadResult, killed_at: float) -> None:
    first = result.first_success_after(killed_at)
    figures.record(f"{label}: first success sent after the kill", first or "none", "s")


def test_cluster_losing_the_stream_leader_and_a_relays_own_node_loses_nothing(
    fault_smtp: SmtpServer,
) -> None:
    with NatsCluster() as cluster:
        n1, n2, _ = cluster.nodes.values()
        with fault_scenario(
            fault_smtp, relays=[n1.url, n2.url], nats_urls=cluster.urls, relay_env=R3
        ) as scene:
            # A fresh cluster may still be electing its JetStream leader when
            # the relays start; their tracking writes then wait in the pending
            # queue until the buckets open. The faults under test come later:
            # start the load once both relays track.
            wait_until_tracking(scene.relays)
            running = scene.send_load(900, concurrency=32, rate=30, delivered_first=60)

            leader = cluster.stream_leader(scene.kv, RECORDS_STREAM)
            leader_killed, leader_back = kill_and_restart(cluster.nodes[leader], scene)
            for node in cluster.nodes.values():
                node.wait_healthy(timeout=60)
            new_leader = cluster.stream_leader(scene.kv, RECORDS_STREAM)

            own_killed, own_back = kill_and_restart(n1, scene)  # relay-0's node
            for node in cluster.nodes.values():
                node.wait_healthy(timeout=60)

            result = scene.result(running, timeout=180)
            figures.record("stream leader killed", f"{leader} (new leader {new_leader})")
            record_stall("stream leader", result, leader_killed)
            record_stall("relay-0's own node n1", result, own_killed)
            figures.record("leader node down for", leader_back - leader_killed, "s")
            figures.record("relay-0's node down for", own_back - own_killed, "s")
            # No assertion on who leads afterwards: the killed leader is
            # restarted within seconds and may legitimately win the election
            # again (seen once on a loaded machine). What the fault must not
            # do is lose, duplicate or untrack an email.
            scene.audit(result)


# --- callers of the replaced relay through a leader kill -9 and a rolling restart


@dataclass
class TrackingWatch:
    """Polls the buckets every ``interval`` in a thread and notes when each
    delivered email of the run was first found recorded and indexed."""

    smtp: SmtpServer
    kv: SyncNats
    run: str
    interval: float = 0.25
    tracked_at: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _poll(self) -> None:
        while not self._stop.is_set():
            found = delivered(self.smtp, self.run)
            waiting = [d for d in found if d.email_id not in self.tracked_at]
            groups = {d.group_id for d in waiting}
            try:
                indexes = {g: set(group_index(self.kv, g) or []) for g in groups}
                for message in waiting:
                    if message.email_id in indexes[message.group_id] and has_record(
                        self.kv, message.email_id
                    ):
                        self.tracked_at[message.email_id] = time.time()
            except Exception:  # the store electing: try again on the next poll
                pass
            self._stop.wait(self.interval)

    @contextmanager
    def running(self) -> Iterator[TrackingWatch]:
        thread = threading.Thread(target=self._poll, name="tracking-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=30)


@dataclass(frozen=True)
class Phase:
    name: str
    started: float
    ended: float

    def requests(self, result: LoadResult) -> list[Request]:
        return [r for r in result.requests if self.started <= r.sent_at < self.ended]


def record_phase(
    phase: Phase,
    result: LoadResult,
    found: list[Delivered],
    tracked_at: dict[str, float] | None = None,
) -> list[Request]:
    """Print the phase's figures (how soon each email was tracked when
    ``tracked_at`` is given, see :class:`TrackingWatch`); its requests."""
    requests = phase.requests(result)
    latencies = sorted(r.latency for r in requests if r.latency is not None)
    outcomes = [r.outcome for r in requests]
    answered = sorted(r.answer.at for r in requests if r.outcome == "ok" and r.answer is not None)
    gaps = [b - a for a, b in itertools.pairwise(answered)]
    by_email = {d.email_id: d for d in found}
    replied = {
        r.body["email_id"]: r.answer.at
        for r in requests
        if r.outcome == "ok" and r.answer is not None and r.body["email_id"] in by_email
    }
    tracked_at = tracked_at if tracked_at is not None else {}
    lags = [tracked_at[e] - at for e, at in replied.items() if e in tracked_at]
    label = phase.name
    figures.record(f"{label}: requests", len(requests))
    figures.record(f"{label}: ok", outcomes.count("ok"))
    figures.record(f"{label}: failed", sum(o not in ("ok", "timeout") for o in outcomes))
    for request in requests:
        if request.outcome not in ("ok", "timeout"):
            at = request.sent_at - phase.started
            figures.record(f"{label}: {request.outcome} for #{request.number}", at, "s in")
    figures.record(f"{label}: caller timeouts", outcomes.count("timeout"))
    figures.record(f"{label}: p50", percentile(latencies, 0.5), "s")
    figures.record(f"{label}: p99", percentile(latencies, 0.99), "s")
    figures.record(f"{label}: max", latencies[-1] if latencies else 0.0, "s")
    figures.record(f"{label}: longest gap between successes", max(gaps, default=0.0), "s")
    if tracked_at:
        figures.record(
            f"{label}: tracked within (after the reply, max)", max(lags, default=0.0), "s"
        )
        figures.record(f"{label}: untracked when the load ended", len(replied) - len(lags))
    return requests


def requests_sent(result: LoadResult) -> LoadResult:
    """The requests the load got to send before it was stopped."""
    return LoadResult([r for r in result.requests if r.sent_at], result.started, time.time())


def assert_every_request_succeeded(phase: Phase, requests: list[Request]) -> None:
    assert requests, f"{phase.name}: no request was sent"
    failed = [r for r in requests if r.outcome != "ok"]
    assert failed == [], f"{phase.name}: {len(failed)} requests not answered ok: " + ", ".join(
        f"#{r.number} {r.outcome}" for r in failed[:10]
    )


def latency_percentile(requests: list[Request], fraction: float) -> float:
    return percentile([r.latency for r in requests if r.latency is not None], fraction)


STEADY_SECONDS = 15.0
LEADER_DOWN_SECONDS = 10.0
AFTER_RESTART_SECONDS = 5.0
RATE = 25.0


def test_callers_without_a_deadline_get_every_success_in_time_through_a_leader_kill_and_a_rolling_restart(  # noqa: E501
    fault_smtp: SmtpServer,
) -> None:
    """The scenario of issue 15: 25 sends/s from callers that send no deadline
    header and wait 10 s, relays on n1 and n2, callers on n3 (the stream leader
    is moved off n3 first, so the kill -9 takes a relay's own node and the
    callers keep theirs). Targets (with a margin for a 2-core host): every
    request a success; leader kill p99 <= 2 s, max <= 3 s; rolling restart
    p99 <= 1 s; every email recorded and indexed once within 30 s of the last
    restart, none delivered twice."""
    with NatsCluster() as cluster:
        n1, n2, n3 = cluster.nodes.values()
        with (
            fault_scenario(
                fault_smtp,
                relays=[n1.url, n2.url],
                nats_urls=cluster.urls,
                callers=[n3.url],
                deadline_header=False,
                relay_env=R3,
            ) as scene,
            SyncNats(cluster.urls) as watcher_kv,
        ):
            wait_until_tracking(scene.relays)
            cluster.move_leader_off(scene.kv, RECORDS_STREAM, "n3")
            watch = TrackingWatch(fault_smtp, watcher_kv, scene.run)
            with watch.running():
                running = scene.send_load(int(RATE * 300), concurrency=64, rate=RATE)
                steady_from = time.time()
                wait_until(lambda: time.time() - steady_from >= STEADY_SECONDS, timeout=60)
                steady = Phase("steady", steady_from, time.time())

                leader = cluster.stream_leader(scene.kv, RECORDS_STREAM)
                kill_from = time.time()
                cluster.nodes[leader].kill()
                wait_until(
                    lambda: time.time() - kill_from >= LEADER_DOWN_SECONDS, timeout=60
                )  # the node stays down this long: the fault, not a synchronisation
                cluster.nodes[leader].start()
                for node in cluster.nodes.values():
                    node.wait_healthy(timeout=60)
                back = time.time()
                wait_until(lambda: time.time() - back >= AFTER_RESTART_SECONDS, timeout=60)
                leader_kill = Phase(f"leader {leader} kill -9", kill_from, time.time())

                rolling_from = time.time()
                for name, node in cluster.nodes.items():
                    figures.record(
                        f"rolling restart: {name} stopped at", time.time() - rolling_from, "s"
                    )
                    node.stop_in_lame_duck_mode()  # as the NATS Helm chart's preStop hook
                    node.start()
                    for other in cluster.nodes.values():
                        other.wait_healthy(timeout=60)
                last_restart = time.time()
                wait_until(lambda: time.time() - last_restart >= AFTER_RESTART_SECONDS, timeout=60)
                rolling = Phase("rolling restart", rolling_from, time.time())

                scene.load.stop()
                sent = requests_sent(scene.result(running))
                found = scene.audit(sent, timeout=30 - (time.time() - last_restart))
            phases = [steady, leader_kill, rolling]
            per_phase = {
                p.name: record_phase(p, sent, found.delivered, watch.tracked_at) for p in phases
            }
            for phase in phases:
                assert_every_request_succeeded(phase, per_phase[phase.name])
            assert latency_percentile(per_phase[leader_kill.name], 0.99) <= 2.0
            assert latency_percentile(per_phase[leader_kill.name], 1.0) <= 3.0
            assert latency_percentile(per_phase[rolling.name], 0.99) <= 1.0


# --- keyed sends while the idempotency stream elects ----------------------------------

IDEMPOTENCY_STREAM = f"KV_{api.IDEMPOTENCY_BUCKET}"


def test_keyed_sends_during_an_election_answer_within_the_reservation_bound_and_send_once(
    fault_smtp: SmtpServer,
) -> None:
    """Keys cannot be reserved while the idempotency stream has no leader: each
    keyed send (no deadline header, 10 s caller) answers ``email delivery
    failed`` within RESERVATION_WAIT (2 s) plus a margin for a 2-core host,
    or succeeds; the same keys retried after the election send each email
    once."""
    with NatsCluster() as cluster:
        n1, n2, n3 = cluster.nodes.values()
        with fault_scenario(
            fault_smtp,
            relays=[n1.url, n2.url],
            nats_urls=cluster.urls,
            callers=[n3.url],
            relay_env=R3,
        ) as scene:
            run, caller, kv = scene.run, scene.load, scene.kv
            wait_until_tracking(scene.relays)
            leader = cluster.move_leader_off(kv, IDEMPOTENCY_STREAM, "n3")
            cluster.nodes[leader].kill()
            killed_at = time.time()
            answers: list[tuple[str, float, dict[str, str]]] = []
            number = 0
            while time.time() - killed_at < LEADER_DOWN_SECONDS:
                key = f"{run}-key-{number}"
                _, body = sends(run, 1, first=number)[0]
                payload = {**json.loads(body), "idempotency_key": key}
                started = time.perf_counter()
                reply = caller.request_json(api.SEND_EMAIL_SUBJECT, payload, timeout=10)
                answers.append((key, time.perf_counter() - started, reply))
                number += 1
            cluster.nodes[leader].start()
            for node in cluster.nodes.values():
                node.wait_healthy(timeout=60)
            cluster.stream_leader(kv, IDEMPOTENCY_STREAM)

            refused = [(k, took) for k, took, reply in answers if "error" in reply]
            figures.record("keyed sends during the election", len(answers))
            figures.record("answered email delivery failed", len(refused))
            figures.record(
                "slowest email delivery failed", max((t for _, t in refused), default=0), "s"
            )
            figures.record("slowest reply", max(t for _, t, _ in answers), "s")
            assert refused, "the election refused no reservation: nothing was tested"
            assert all(
                "email_id" in reply or reply == {"error": api.ERR_DELIVERY_FAILED}
                for _, _, reply in answers
            ), answers
            assert max(took for _, took in refused) <= 3.0

            for n, (key, _, reply) in enumerate(answers):
                if "error" in reply:
                    _, body = sends(run, 1, first=n)[0]
                    retried = caller.request_json(
                        api.SEND_EMAIL_SUBJECT,
                        {**json.loads(body), "idempotency_key": key},
                        timeout=10,
                    )
                    assert "email_id" in retried, (key, retried)
            found = delivered(fault_smtp, run)
            assert len(found) == len(answers)
            assert sorted(d.number or 0 for d in found) == list(range(len(answers)))


# --- no leader at all, for longer than the pending writes' retry bound -----------------

NO_QUORUM_SECONDS = 15.0
"""Longer than the pending writes' backoff cap (5 s, emailrelay.store.pending),
so they retry at the cap several times before the store answers."""


def test_no_leader_for_longer_than_the_pending_retry_bound_answers_every_send_in_time(
    fault_smtp: SmtpServer,
) -> None:
    """Two of three nodes killed: no stream has a leader (no quorum) for 15 s,
    while the relay's own node and its callers stay up. Every send answers
    its success within TRACKING_WAIT plus a margin, and every email is
    recorded and indexed once the quorum is back."""
    with NatsCluster() as cluster:
        n1, n2, n3 = cluster.nodes.values()
        with fault_scenario(
            fault_smtp,
            relays=[n1.url],
            nats_urls=cluster.urls,
            callers=[n1.url],
            deadline_header=False,
            relay_env=R3,
        ) as scene:
            wait_until_tracking(scene.relays)
            running = scene.send_load(
                int(RATE * 120), concurrency=64, rate=RATE, delivered_first=25
            )
            n2.kill()
            n3.kill()
            killed_at = time.time()
            wait_until(lambda: time.time() - killed_at >= NO_QUORUM_SECONDS, timeout=60)
            n2.start(wait=False)
            n3.start(wait=False)
            for node in cluster.nodes.values():
                node.wait_healthy(timeout=60)
            back = time.time()
            wait_until(lambda: time.time() - back >= AFTER_RESTART_SECONDS, timeout=60)
            scene.load.stop()
            sent = requests_sent(scene.result(running, timeout=60))
            found = scene.audit(sent, timeout=30 - (time.time() - back))
            outage = Phase("no quorum", killed_at, back)
            during = record_phase(outage, sent, found.delivered)
            assert_every_request_succeeded(outage, during)
            assert latency_percentile(during, 1.0) <= 3.0
