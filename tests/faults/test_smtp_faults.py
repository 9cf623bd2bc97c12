"""SMTP outages under load: the provider refusing for 5 s, gone for 35 s.

Callers wait 10 s, as the relay's client does. A send the relay retries past
its caller's deadline and then delivers is one the caller may send again, so
the audit counts every email delivered after its caller gave up.
"""

from __future__ import annotations

import time

import pytest

from tests.faults import figures
from tests.faults.scenario import fault_scenario
from tests.support.servers.smtp import SmtpServer

pytestmark = pytest.mark.faults


def test_smtp_refusing_for_5_seconds_under_load_costs_no_error_and_no_duplicate(
    fault_smtp: SmtpServer,
) -> None:
    with fault_scenario(fault_smtp, relays=2) as scene:
        running = scene.send_load(500, concurrency=32, rate=50, delivered_first=100)
        fault_smtp.fail_all("MAIL", 421, "service not available")
        refused_at = time.time()
        time.sleep(5.0)  # the fault is its duration
        fault_smtp.stop_failing("MAIL")
        restored_at = time.time()
        result = scene.result(running)

        figures.record("outage", restored_at - refused_at, "s")
        first = scene.first_success_after(result, restored_at, "the outage")
        scene.audit(result)
        assert result.outcomes().get("email delivery failed", 0) == 0
        assert first is not None, "no request sent after the outage succeeded"


def test_smtp_gone_for_35_seconds_under_load_delivers_nothing_after_its_caller_gave_up(
    fault_smtp: SmtpServer,
) -> None:
    with fault_scenario(fault_smtp, relays=2) as scene:
        running = scene.send_load(400, concurrency=64, rate=20, delivered_first=60)
        fault_smtp.go_away()
        gone_at = time.time()
        time.sleep(35.0)  # the fault is its duration
        fault_smtp.come_back()
        back_at = time.time()
        result = scene.result(running, timeout=180)

        figures.record("outage", back_at - gone_at, "s")
        first = scene.first_success_after(result, back_at, "the outage")
        scene.audit(result)
        assert first is not None, "no request sent after the outage succeeded"
