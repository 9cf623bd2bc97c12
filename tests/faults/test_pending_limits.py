"""The pending tracking writes at their real bound, end to end: a relay whose
``email-recipients`` bucket is gone (``KV_AUTO_CREATE=false``) queues every
send's tracking until 64 MiB of records are pending, then drops and counts.

Records of ~60 KB (long subjects) reach the 64 MiB bound after ~1,100 sends;
the 10,000-write bound, and both defaults, are proven fast in
test_pending_tracking.py.
"""

from __future__ import annotations

import json

import pytest

from emailrelay import api
from emailrelay.store import buckets
from emailrelay.store.pending import MAX_BYTES
from tests.faults import figures
from tests.faults.scenario import fault_scenario
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.smtp import SmtpServer

pytestmark = pytest.mark.faults

SUBJECT = "s" * 60_000
SENDS = 1_300
"""More than 64 MiB of ~60 KB records."""


def test_pending_writes_past_64_mib_are_dropped_and_counted_as_tracking_write_failures(
    fault_smtp: SmtpServer,
) -> None:
    with NatsServer() as nats, SyncNats(nats.url) as client:
        for spec in (buckets.RECIPIENTS, buckets.GROUP_INDEX):
            client.create_bucket(spec.name, max_value_size=spec.max_value_size, direct=True)
        with fault_scenario(
            fault_smtp,
            nats_urls=[nats.url],
            relays=[nats.url],
            relay_env={"KV_AUTO_CREATE": "false", "LOG_LEVEL": "warning"},
            latency=0.0,
        ) as scene:
            (relay,) = scene.relays
            client.delete_bucket(api.RECIPIENTS_BUCKET)
            body = {"to": "jane@example.org", "subject": SUBJECT, "html": "<p>x</p>", "text": "x"}
            payload = json.dumps(body).encode()
            result = scene.load.run_load([(api.SEND_EMAIL_SUBJECT, payload)] * SENDS, 32)
            pending = relay.metric("emailrelay_tracking_pending")
            dropped = relay.metric("emailrelay_tracking_pending_dropped_total")
            failures = relay.metric("emailrelay_tracking_write_failures_total")

    figures.record("tracking writes pending at the bound", pending)
    figures.record("tracking writes dropped", dropped)
    assert result.outcomes() == {"ok": SENDS}, "the emails are out: every caller gets a success"
    assert len(fault_smtp.messages) == SENDS
    assert 0 < pending < SENDS
    assert pending * len(SUBJECT) <= MAX_BYTES
    assert pending + dropped == SENDS
    assert failures == dropped
