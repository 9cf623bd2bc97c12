"""Readiness that tells the truth: ``/readyz`` answers 200 only once the relay
is in the queue group of every subject it answers at start (sends, and with
tracking on the status and analytics queries), so nothing routed on its word
finds no responder.

The relay is served in process against a real nats-server, with one
subscription held back until the test lets it through."""

from __future__ import annotations

import anyio
import httpx
import pytest
import trio

from emailrelay import api, app
from emailrelay.bridge.loop import asyncio_loop
from emailrelay.bridge.nats import Deliver, NatsConnection, RequestSubscription, drained_on_exit
from emailrelay.config import load_settings
from emailrelay.supervision import Lifecycle
from tests.support.servers.nats import NatsServer
from tests.support.waiting import LOOPBACK, free_port

POLL_SECONDS = 0.02


class SubscriptionHeld(NatsConnection):
    """A real connection whose subscription to :attr:`held` waits for :attr:`release`."""

    held: str
    asked: anyio.Event
    release: anyio.Event

    async def queue_subscribe(
        self, subject: str, queue: str, deliver: Deliver
    ) -> RequestSubscription:
        if subject == self.held:
            self.asked.set()
            await self.release.wait()
        return await super().queue_subscribe(subject, queue, deliver)


async def _readyz_once_answering(http: httpx.AsyncClient, url: str) -> int:
    """The first status ``/readyz`` answers (the health server binds on its own time)."""
    while True:
        try:
            return (await http.get(url)).status_code
        except httpx.TransportError:
            await anyio.sleep(POLL_SECONDS)


async def _until_readyz(http: httpx.AsyncClient, url: str, status: int) -> None:
    while True:
        if (await http.get(url)).status_code == status:
            return
        await anyio.sleep(POLL_SECONDS)


@pytest.mark.parametrize(
    "held", [api.SEND_EMAIL_SUBJECT, api.GET_EMAIL_STATUS_SUBJECT], ids=["send", "status"]
)
async def test_readyz_answers_503_until_each_subscription_exists(
    nats_server: NatsServer, held: str
) -> None:
    port = free_port()
    settings = load_settings(
        {"NATS_URL": nats_server.url, "PORT": str(port), "HTTP_HOST": LOOPBACK}
    )
    url = f"http://{LOOPBACK}:{port}/readyz"
    lifecycle = Lifecycle()
    async with asyncio_loop():
        nats = await SubscriptionHeld.connect(settings.nats_urls, None, give_up_after=10)
        nats.held, nats.asked, nats.release = held, anyio.Event(), anyio.Event()
        async with (
            drained_on_exit(nats),
            httpx.AsyncClient(trust_env=False, timeout=2) as http,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(app.serve, settings, nats, lifecycle)
            with trio.fail_after(20):
                await nats.asked.wait()
                held_status = await _readyz_once_answering(http, url)
                nats.release.set()
                await _until_readyz(http, url, 200)
            lifecycle.stop()
    assert held_status == 503
