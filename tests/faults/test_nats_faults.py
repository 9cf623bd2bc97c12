"""nats-server killed (``kill -9``) and restarted on its port with its store, under load."""

from __future__ import annotations

import time

import pytest

from emailrelay.handlers.send import TRACKING_WAIT
from tests.faults import figures
from tests.faults.audit import (
    assert_intact,
    audit_when_tracked,
    check_callers,
    delivered,
    record_load_figures,
)
from tests.faults.load import LoadGenerator, new_run, sends
from tests.faults.relays import metric_total, running_relays, scrape, wait_ready_since
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.faults

TRACKING_RETRY = TRACKING_WAIT
"""How long the relay retries a tracking write before the reply (SendEmailHandler)."""


def test_nats_kill_9_and_restart_under_load_with_two_relays(fault_smtp: SmtpServer) -> None:
    run = new_run()
    fault_smtp.latency = 0.02
    with (
        NatsServer() as nats,
        running_relays([nats.url, nats.url], fault_smtp) as relays,
        LoadGenerator(nats.url) as load,
        SyncNats(nats.url) as kv,
    ):
        running = load.start(sends(run, 600), concurrency=32, rate=60)
        wait_until(lambda: len(delivered(fault_smtp, run)) >= 100, timeout=30)
        killed_at = time.time()
        nats.kill()
        for relay in relays:
            relay.wait_readyz(503, timeout=15)
        nats.start()
        restarted_at = time.time()
        ready = [wait_ready_since(relay, restarted_at) for relay in relays]
        result = running.result(timeout=120)
        load.settle()
        found = audit_when_tracked(fault_smtp, kv, run)

        figures.record("outage (kill to restart)", restarted_at - killed_at, "s")
        for n, seconds in enumerate(ready):
            figures.record(f"relay-{n} ready again after the restart", seconds, "s")
        first = result.first_success_after(restarted_at)
        figures.record("first success after the restart", first if first is not None else "none")
        record_load_figures(result, found)
        assert_intact(found, check_callers(result, found.delivered))
        assert result.successes(), "no request succeeded"


def test_emails_sent_while_nats_is_down_longer_than_the_tracking_retry_are_tracked(
    fault_smtp: SmtpServer,
) -> None:
    """Sends at the SMTP server when NATS dies reach the provider while it is down;
    their records are written once it is back (the pending tracking queue)."""
    run = new_run()
    count = 24
    fault_smtp.latency = 2.0  # every send is at the SMTP server when NATS dies
    with (
        NatsServer() as nats,
        running_relays([nats.url], fault_smtp, {"SMTP_POOL_SIZE": str(count)}) as (relay,),
        LoadGenerator(nats.url) as load,
        SyncNats(nats.url) as kv,
    ):
        running = load.start(sends(run, count), concurrency=count)
        wait_until(
            lambda: metric_total(scrape(relay), "emailrelay_requests_in_flight") == count,
            timeout=15,
            message="the sends did not all reach the relay",
        )
        nats.kill()
        fault_smtp.wait_for_messages(count, timeout=30)
        last_delivery = max(d.received_at for d in delivered(fault_smtp, run))
        # The fault is the duration: NATS stays away longer than the relay retries
        # a tracking write before it replies.
        time.sleep(max(0.0, last_delivery + TRACKING_RETRY + 2.0 - time.time()))
        pending = metric_total(scrape(relay), "emailrelay_tracking_pending")
        nats.start()
        restarted_at = time.time()
        result = running.result(timeout=60)
        found = audit_when_tracked(fault_smtp, kv, run, timeout=30)
        tracked_after = time.time() - restarted_at
        untracked = len(found.untracked())

        figures.record("NATS down for", restarted_at - last_delivery, "s after the last delivery")
        figures.record("tracking writes pending at the restart", pending or "no metric")
        if untracked:
            figures.record("emails still untracked 30 s after the restart", untracked)
        else:
            figures.record("every record and index entry stored after", tracked_after, "s")
        record_load_figures(result, found)
        assert len(found.delivered) == count
        assert_intact(found, check_callers(result, found.delivered))


def test_sigterm_while_nats_is_down_exits_0(fault_smtp: SmtpServer) -> None:
    with NatsServer() as nats, running_relays([nats.url], fault_smtp) as (relay,):
        nats.kill()
        relay.wait_readyz(503, timeout=15)
        relay.terminate()
        code = relay.wait(timeout=40)
        assert code == 0, relay.logs()[-3000:]
        assert "Traceback" not in relay.stderr(), relay.stderr()[-3000:]
