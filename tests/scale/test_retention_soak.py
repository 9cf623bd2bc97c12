"""The storage bound of ``RETENTION`` (``nox -s scale``): a relay sending
steadily for several retention periods; the tracking buckets' message count
and size level off instead of growing with everything ever sent."""

from __future__ import annotations

import time
import uuid

import pytest

from emailrelay import api
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import running_relay
from tests.support.servers.smtp import SmtpServer

pytestmark = pytest.mark.scale

RETENTION = 2.0
PERIODS = 8
RATE = 50.0  # sends per second, paced: a steady load, whatever the warm-up
BATCH = 10
BUCKETS = (api.RECIPIENTS_BUCKET, api.GROUP_INDEX_BUCKET, api.RECIPIENT_INDEX_BUCKET)


def stored(client: SyncNats) -> tuple[int, int]:
    """Messages and bytes in the three tracking buckets' streams."""

    async def go() -> tuple[int, int]:
        messages = size = 0
        for bucket in BUCKETS:
            info = await client.js.stream_info(f"KV_{bucket}")
            messages += info.state.messages
            size += info.state.bytes
        return messages, size

    return client.run(go())


def test_tracking_storage_levels_off_under_retention(smtp_server: SmtpServer) -> None:
    groups = [f"soak-{uuid.uuid4()}" for _ in range(3)]
    samples: list[tuple[float, int, int]] = []
    sent = 0
    with (
        NatsServer() as server,
        SyncNats(server.url) as client,
        running_relay(server, smtp_server, {"RETENTION": f"{RETENTION:g}s"}),
    ):
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < PERIODS * RETENTION:
            payloads: list[object] = [
                send_request(to=f"user{sent + n}@example.org", group_id=groups[n % 3])
                for n in range(BATCH)
            ]
            client.request_many(api.SEND_EMAIL_SUBJECT, payloads, concurrency=BATCH, timeout=30)
            sent += len(payloads)
            samples.append((elapsed, *stored(client)))
            time.sleep(max(0.0, start + sent / RATE - time.monotonic()))  # pacing
    settled = [s for s in samples if 3 * RETENTION <= s[0] < 5 * RETENTION]
    late = [s for s in samples if s[0] >= (PERIODS - 2) * RETENTION]
    print(
        f"\nsent {sent} in {PERIODS * RETENTION:g}s; messages/bytes in periods 4-5: "
        f"max {max(s[1] for s in settled)}/{max(s[2] for s in settled)}; "
        f"in the last 2 periods: max {max(s[1] for s in late)}/{max(s[2] for s in late)}"
    )
    assert max(s[1] for s in late) <= 1.5 * max(s[1] for s in settled)
    assert max(s[2] for s in late) <= 1.5 * max(s[2] for s in settled)
    assert max(s[1] for s in late) < sent  # far below everything ever sent (~3 keys each)
