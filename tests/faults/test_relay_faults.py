"""A relay SIGKILLed under load: the queue group's other member takes over."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults import figures
from tests.faults.audit import (
    Delivered,
    assert_intact,
    audit_when_tracked,
    check_callers,
    delivered,
    record_load_figures,
)
from tests.faults.load import LoadGenerator, new_run, sends
from tests.faults.relays import running_relays
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.faults

CONCURRENCY = 32


def test_relay_sigkilled_under_load_loses_nothing_but_its_own_in_flight_tracking(
    fault_smtp: SmtpServer,
) -> None:
    run = new_run()
    fault_smtp.latency = 0.05
    with (
        NatsServer() as nats,
        running_relays([nats.url, nats.url], fault_smtp) as (victim, survivor),
        LoadGenerator(nats.url) as load,
        SyncNats(nats.url) as kv,
    ):
        running = load.start(sends(run, 600), concurrency=CONCURRENCY, rate=60)
        wait_until(lambda: len(delivered(fault_smtp, run)) >= 150, timeout=30)
        victim.terminate(signal.SIGKILL)
        killed_at = time.time()
        victim.wait(timeout=10)
        result = running.result(timeout=120)
        load.settle()

        def lost_with_the_victim(message: Delivered) -> bool:
            # Its pending tracking writes died with it (documented).
            return message.sender_name == "relay-0"

        found = audit_when_tracked(fault_smtp, kv, run, excused=lost_with_the_victim)
        lost = [d for d in found.untracked() if lost_with_the_victim(d)]
        first = result.first_success_after(killed_at)
        figures.record("first success sent after the kill", first if first is not None else "none")
        figures.record("emails sent by the killed relay without record or index", len(lost))
        figures.record(
            "emails sent by the survivor", sum(d.sender_name == "relay-1" for d in found.delivered)
        )
        record_load_figures(result, found)
        assert_intact(found, check_callers(result, found.delivered), excused=lost_with_the_victim)
        assert len(lost) <= CONCURRENCY, "more lost than the killed relay can have had in flight"
        assert survivor.returncode is None
        assert result.first_success_after(killed_at) is not None, "the survivor took no request"
