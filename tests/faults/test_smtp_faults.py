"""SMTP outages under load: the provider refusing for 5 s, gone for 35 s.

Callers wait 10 s, as the relay's client does. A send the relay retries past
its caller's deadline and then delivers is one the caller may send again, so
the audit counts every email delivered after its caller gave up.
"""

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
from tests.faults.load import LoadGenerator, new_run, sends
from tests.faults.relays import running_relays
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.faults


def test_smtp_refusing_for_5_seconds_under_load_costs_no_error_and_no_duplicate(
    fault_smtp: SmtpServer,
) -> None:
    run = new_run()
    fault_smtp.latency = 0.02
    with (
        NatsServer() as nats,
        running_relays([nats.url, nats.url], fault_smtp) as _relays,
        LoadGenerator(nats.url) as load,
        SyncNats(nats.url) as kv,
    ):
        running = load.start(sends(run, 500), concurrency=32, rate=50)
        wait_until(lambda: len(delivered(fault_smtp, run)) >= 100, timeout=30)
        fault_smtp.fail_all("MAIL", 421, "service not available")
        refused_at = time.time()
        time.sleep(5.0)  # the fault is its duration
        fault_smtp.stop_failing("MAIL")
        restored_at = time.time()
        result = running.result(timeout=120)
        load.settle()
        found = audit_when_tracked(fault_smtp, kv, run)

        figures.record("outage", restored_at - refused_at, "s")
        first = result.first_success_after(restored_at)
        figures.record("first success after the outage", first if first is not None else "none")
        record_load_figures(result, found)
        assert_intact(found, check_callers(result, found.delivered))
        assert result.outcomes().get("email delivery failed", 0) == 0


def test_smtp_gone_for_35_seconds_under_load_delivers_nothing_after_its_caller_gave_up(
    fault_smtp: SmtpServer,
) -> None:
    run = new_run()
    fault_smtp.latency = 0.02
    with (
        NatsServer() as nats,
        running_relays([nats.url, nats.url], fault_smtp) as _relays,
        LoadGenerator(nats.url) as load,
        SyncNats(nats.url) as kv,
    ):
        running = load.start(sends(run, 400), concurrency=64, rate=20)
        wait_until(lambda: len(delivered(fault_smtp, run)) >= 60, timeout=30)
        fault_smtp.go_away()
        gone_at = time.time()
        time.sleep(35.0)  # the fault is its duration
        fault_smtp.come_back()
        back_at = time.time()
        result = running.result(timeout=180)
        load.settle()
        found = audit_when_tracked(fault_smtp, kv, run)
        callers = check_callers(result, found.delivered)

        figures.record("outage", back_at - gone_at, "s")
        first = result.first_success_after(back_at)
        figures.record("first success after the outage", first if first is not None else "none")
        figures.record(
            "emails delivered after their caller gave up",
            len(callers.delivered_after_caller_gave_up),
        )
        record_load_figures(result, found)
        assert_intact(found, callers)
