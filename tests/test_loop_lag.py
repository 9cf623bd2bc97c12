"""``emailrelay_event_loop_lag_seconds``: how late the event loop wakes up.

Fast tests of the window and the watcher, then the relay end to end: the
largest payload NATS accepts (1 MiB) in every field of every request, with
the lag read from ``/metrics`` afterwards. Before the input bounds one such
request held the loop for 3 to 49 s; the bound asserted here is loose (1 s),
and the figures are printed (``-s``) so a run reports them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import anyio
import pytest

from emailrelay import api
from emailrelay.looplag import LagWindow, watch_loop_lag
from tests.support.nats_client import SyncNats
from tests.support.send_requests import NATS_MAX_PAYLOAD, padded_to_max_payload, send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_for

GAUGE = "emailrelay_event_loop_lag_seconds"


def test_the_window_reports_its_worst_lag() -> None:
    window = LagWindow(window=10)
    window.record(0, 0.01)
    assert window.record(1, 2.0) == 2.0
    assert window.record(2, 0.01) == 2.0


def test_a_lag_leaves_the_window_once_it_is_older_than_the_window() -> None:
    window = LagWindow(window=10)
    window.record(0, 2.0)
    window.record(5, 0.5)
    assert window.record(10, 0.01) == 0.5
    assert window.record(15.5, 0.02) == 0.02


async def test_the_watcher_sees_a_blocked_loop() -> None:
    seen: list[float] = []
    stall_seen = anyio.Event()

    def publish(lag: float) -> None:
        seen.append(lag)
        if lag >= 0.25:
            stall_seen.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_loop_lag, 0.01, LagWindow(), publish)
        await wait_for(lambda: seen, message="the watcher never measured")
        time.sleep(0.3)  # noqa: ASYNC251 - holding the loop is the point
        with anyio.fail_after(5):
            await stall_seen.wait()
        tg.cancel_scope.cancel()
    assert max(seen) >= 0.25


# --- end to end ----------------------------------------------------------------------


@pytest.fixture
def relay(module_nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    """A relay of each test's own: the gauge keeps the worst lag of the last
    30 s, so a stall in one case must not be read by the next."""
    with running_relay(module_nats_server, smtp_server) as process:
        yield process


def loop_lag(relay: RelayProcess) -> float:
    metrics = relay.get("/metrics", timeout=60).text
    match = re.search(rf"^{GAUGE} (\S+)$", metrics, re.MULTILINE)
    assert match, metrics
    return float(match.group(1))


SEND_FIELDS = ["to", "from", "reply_to", "from_display_name", "subject", "html", "text"]
SEND_FIELDS.append("group_id")
LARGEST_REQUESTS = [
    *[(api.SEND_EMAIL_SUBJECT, send_request(), field) for field in SEND_FIELDS],
    (api.GET_EMAIL_STATUS_SUBJECT, {}, "email_id"),
    (api.GET_EMAIL_STATUS_SUBJECT, {}, "group_id"),
    (api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT, {}, "group_id"),
]


def test_the_gauge_is_exposed(relay: RelayProcess) -> None:
    assert 0 <= loop_lag(relay) < 1


@pytest.mark.parametrize("unit", ["x ", "x"], ids=["with-spaces", "one-word"])
@pytest.mark.parametrize(
    ("subject", "base", "field_name"),
    LARGEST_REQUESTS,
    ids=[f"{s.rsplit('.', 1)[1]}-{f}" for s, _, f in LARGEST_REQUESTS],
)
def test_the_largest_payload_in_any_field_keeps_the_loop_lag_under_a_second(
    relay: RelayProcess,
    module_nats_client: SyncNats,
    smtp: SmtpServer,
    subject: str,
    base: dict[str, str],
    field_name: str,
    unit: str,
) -> None:
    body = padded_to_max_payload(dict(base), field_name, unit)
    assert len(body) > NATS_MAX_PAYLOAD - 16
    started = time.monotonic()
    reply = module_nats_client.request_json(subject, body, timeout=120)
    took = time.monotonic() - started
    lag = loop_lag(relay)
    outcome = reply.get("error", "ok")
    print(f"\nloop lag {lag:.3f} s, reply in {took:.2f} s ({field_name}, {unit!r}: {outcome})")
    assert outcome != api.ERR_INTERNAL
    assert lag < 1.0
