"""A relay SIGKILLed under load: the queue group's other member takes over."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults import figures
from tests.faults.audit import Delivered
from tests.faults.scenario import fault_scenario
from tests.support.servers.smtp import SmtpServer

pytestmark = pytest.mark.faults

CONCURRENCY = 32
KEYED_CONCURRENCY = 8


def lost_with_the_victim(message: Delivered) -> bool:
    # Its pending tracking writes died with it (documented).
    return message.sender_name == "relay-0"


def test_relay_sigkilled_under_load_loses_nothing_but_its_own_in_flight_tracking(
    fault_smtp: SmtpServer,
) -> None:
    """Keyed senders retry what the kill cost them with the same key: a key the
    victim held mid-send answers "outcome unknown" or its first reply, never a
    second message."""
    # 0.2 s in DATA: the victim holds keyed sends when it dies.
    with fault_scenario(fault_smtp, relays=2, latency=0.2) as scene:
        victim, survivor = scene.relays
        plain = scene.send_load(600, concurrency=CONCURRENCY, rate=60)
        keyed = scene.send_load(200, concurrency=KEYED_CONCURRENCY, rate=20, first=600, keyed=True)
        scene.wait_delivered(150)
        victim.terminate(signal.SIGKILL)
        killed_at = time.time()
        victim.wait(timeout=10)
        result = scene.result(plain).then(scene.retry_keyed(scene.result(keyed)))

        first = scene.first_success_after(result, killed_at, "the kill")
        found = scene.audit(result, excused=lost_with_the_victim)
        lost = [d for d in found.untracked() if lost_with_the_victim(d)]
        figures.record("emails sent by the killed relay without record or index", len(lost))
        figures.record(
            "emails sent by the survivor", sum(d.sender_name == "relay-1" for d in found.delivered)
        )
        in_flight = CONCURRENCY + KEYED_CONCURRENCY
        assert len(lost) <= in_flight, "more lost than the killed relay can have had in flight"
        assert survivor.returncode is None
        assert first is not None, "the survivor took no request"
