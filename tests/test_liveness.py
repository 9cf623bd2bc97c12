"""Liveness that tells the truth: a relay whose NATS connection is closed for
good stops (exit 1) so that its orchestrator restarts it, and ``/livez``
answers 503 while the asyncio side does not complete round trips."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import httpx
import nats.errors
import pytest
import trio_asyncio

from emailrelay import api
from emailrelay.bridge.watchdog import LoopWatchdog
from emailrelay.health import serve_health
from tests.conftest import RelayFactory
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.waiting import LOOPBACK, free_port

SHORT_CONTROL_LINE = 256
"""A nats-server whose protocol lines are this short (the default is 4 KiB)
closes a client's connection over a subject that a caller can provoke
without tripping any of the relay's own length bounds."""


@pytest.fixture
def short_line_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    config = tmp_path / "nats.conf"
    config.write_text(f"max_control_line: {SHORT_CONTROL_LINE}\n")
    with NatsServer(extra_args=("-c", str(config))) as server:
        yield server


def test_relay_exits_1_when_nats_closes_its_connection_for_good(
    relay_factory: RelayFactory, short_line_nats_server: NatsServer
) -> None:
    relay = relay_factory({"NATS_URL": short_line_nats_server.url})
    # The group's key goes into the JetStream direct-get subject: a line over
    # the server's limit, so nats-server answers -ERR and hangs up, and
    # nats-py does not reconnect after a server -ERR. No reply comes.
    with (
        SyncNats(short_line_nats_server.url) as client,
        pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)),
    ):
        client.request(api.GET_EMAIL_STATUS_SUBJECT, {"group_id": "g" * 200}, timeout=2)
    assert relay.wait(timeout=30) == 1, relay.logs()
    assert "NATS connection closed for good" in relay.stderr()
    assert "maximum control line exceeded" in short_line_nats_server.logs().lower()


@pytest.mark.parametrize("length", [3584, 3585, 4100])
@pytest.mark.parametrize("field", ["email_id", "group_id"])
def test_no_status_query_makes_nats_close_the_relays_connection(
    relay_factory: RelayFactory, nats_client: SyncNats, field: str, length: int
) -> None:
    relay = relay_factory()
    reply = nats_client.request_json(api.GET_EMAIL_STATUS_SUBJECT, {field: "k" * length})
    assert reply == {"error": api.ERR_NOT_FOUND}
    assert relay.readyz_status() == 200
    assert "email_id" in nats_client.request_json(
        api.SEND_EMAIL_SUBJECT,
        send_request(),
    )


async def test_livez_answers_200_while_the_asyncio_loop_completes_round_trips() -> None:
    async with trio_asyncio.open_loop():
        watchdog = LoopWatchdog(interval=0.05, stale_after=0.5)
        # Several watchdog rounds (interval 0.05 s) all answered 200.
        assert await _livez_statuses(watchdog, polls=20) == [200] * 20


async def test_livez_answers_503_when_the_asyncio_loop_stops_completing_round_trips() -> None:
    async def never_returns() -> None:
        # An asyncio-side wait that never completes: the loop does not answer.
        await trio_asyncio.aio_as_trio(asyncio.Event().wait)()

    async with trio_asyncio.open_loop():
        watchdog = LoopWatchdog(cross=never_returns, interval=0.05, stale_after=0.5)
        assert await _livez_becomes(watchdog, 503, within=10.0)


@asynccontextmanager
async def _serving_livez(watchdog: LoopWatchdog) -> AsyncIterator[httpx.AsyncClient]:
    """``/livez`` served with ``watchdog`` running; a client whose base URL is it."""
    port = free_port()
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watchdog.run)
        await tg.start(
            partial(serve_health, LOOPBACK, port, lambda: True, stopping, is_alive=watchdog.alive)
        )
        async with httpx.AsyncClient(
            base_url=f"http://{LOOPBACK}:{port}", trust_env=False, timeout=2
        ) as http:
            yield http
        stopping.set()
        tg.cancel_scope.cancel()


async def _livez_statuses(watchdog: LoopWatchdog, polls: int) -> list[int]:
    """``/livez``'s status at ``polls`` polls 0.05 s apart."""
    statuses = []
    async with _serving_livez(watchdog) as http:
        for _ in range(polls):
            statuses.append((await http.get("/livez")).status_code)
            await anyio.sleep(0.05)  # a polling interval, not a wait for a condition
    return statuses


async def _livez_becomes(watchdog: LoopWatchdog, status: int, within: float) -> bool:
    """Whether ``/livez`` answers ``status`` within ``within`` seconds (polled)."""
    async with _serving_livez(watchdog) as http:
        with anyio.move_on_after(within):
            while (await http.get("/livez")).status_code != status:  # noqa: ASYNC110 (HTTP)
                await anyio.sleep(0.05)
            return True
    return False
