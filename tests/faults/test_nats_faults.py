"""nats-server killed (``kill -9``) and restarted on its port with its store, under load."""

from __future__ import annotations

import time

import pytest

from emailrelay.handlers.send import TRACKING_WAIT
from tests.faults import figures
from tests.faults.relays import metric_total, scrape, wait_ready_since
from tests.faults.scenario import fault_scenario
from tests.support.servers.smtp import SmtpServer

pytestmark = pytest.mark.faults

TRACKING_RETRY = TRACKING_WAIT
"""How long the relay retries a tracking write before the reply (SendEmailHandler)."""


def test_nats_kill_9_and_restart_under_load_with_two_relays(fault_smtp: SmtpServer) -> None:
    """Keyed senders run beside the plain ones and retry what failed with the
    same key: one message per key, whatever the restart did to their replies."""
    with fault_scenario(fault_smtp, relays=2) as scene:
        assert scene.nats is not None
        plain = scene.send_load(600, concurrency=32, rate=60)
        keyed = scene.send_load(200, concurrency=8, rate=20, first=600, keyed=True)
        scene.wait_delivered(100)
        killed_at = time.time()
        scene.nats.kill()
        for relay in scene.relays:
            relay.wait_readyz(503, timeout=15)
        scene.nats.start()
        restarted_at = time.time()
        ready = [wait_ready_since(relay, restarted_at) for relay in scene.relays]
        result = scene.result(plain).then(scene.retry_keyed(scene.result(keyed)))

        figures.record("outage (kill to restart)", restarted_at - killed_at, "s")
        for n, seconds in enumerate(ready):
            figures.record(f"relay-{n} ready again after the restart", seconds, "s")
        first = scene.first_success_after(result, restarted_at, "the restart")
        scene.audit(result)
        assert first is not None, "no request sent after the restart succeeded"


def test_emails_sent_while_nats_is_down_longer_than_the_tracking_retry_are_tracked(
    fault_smtp: SmtpServer,
) -> None:
    """Sends at the SMTP server when NATS dies reach the provider while it is down;
    their records are written once it is back (the pending tracking queue)."""
    count = 24
    # Every send is at the SMTP server when NATS dies.
    with fault_scenario(fault_smtp, relay_env={"SMTP_POOL_SIZE": str(count)}, latency=2.0) as scene:
        assert scene.nats is not None
        (relay,) = scene.relays
        # Half the callers give an idempotency key: once NATS is back they send
        # again with it, and must not cause a second message.
        plain = scene.send_load(count // 2, concurrency=count)
        keyed = scene.send_load(count // 2, concurrency=count, first=count // 2, keyed=True)
        # Every send in DATA (keyed ones past their reservation) before NATS dies.
        fault_smtp.wait_for_data(count, timeout=15)
        scene.nats.kill()
        fault_smtp.wait_for_messages(count, timeout=30)
        last_delivery = max(d.received_at for d in scene.delivered())
        # The fault is the duration: NATS stays away longer than the relay retries
        # a tracking write before it replies.
        time.sleep(max(0.0, last_delivery + TRACKING_RETRY + 2.0 - time.time()))
        pending = metric_total(scrape(relay), "emailrelay_tracking_pending")
        scene.nats.start()
        restarted_at = time.time()
        result = scene.result(plain, timeout=60).then(
            scene.retry_keyed(scene.result(keyed, timeout=60), concurrency=count)
        )
        figures.record("NATS down for", restarted_at - last_delivery, "s after the last delivery")
        figures.record("tracking writes pending at the restart", pending or "no metric")
        found = scene.audit(result)
        figures.record("every record and index entry stored after", time.time() - restarted_at, "s")
        assert len(found.delivered) == count  # the retries sent nothing twice


def test_sigterm_while_nats_is_down_exits_0(fault_smtp: SmtpServer) -> None:
    with fault_scenario(fault_smtp) as scene:
        assert scene.nats is not None
        (relay,) = scene.relays
        scene.nats.kill()
        relay.wait_readyz(503, timeout=15)
        relay.terminate()
        code = relay.wait(timeout=40)
        assert code == 0, relay.logs()[-3000:]
        assert "Traceback" not in relay.stderr(), relay.stderr()[-3000:]
