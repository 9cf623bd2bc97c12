"""Reads have their own budget (MAX_READS_IN_FLIGHT running, as many again
waiting) beside the send backlog: a full send backlog never pauses them, and
a read beyond the budget answers ``overloaded`` (503) at once, counted per
subject.

Fast tests of :class:`emailrelay.server.RequestServer` over a stand-in NATS
connection; the same behaviour against a real nats-server and relay is in
tests/test_overload.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from prometheus_client import REGISTRY

from emailrelay import api
from emailrelay.bridge.nats import Deliver, IncomingRequest
from emailrelay.deadline import Deadline
from emailrelay.handlers.replies import Reply
from emailrelay.server import Handler, RequestServer


@dataclass
class FakeSubscription:
    subject: str
    paused: bool = False
    was_paused: anyio.Event = field(default_factory=anyio.Event)

    async def pause(self) -> None:
        self.paused = True
        self.was_paused.set()

    async def resume(self) -> None:
        self.paused = False

    async def drain(self) -> None:
        self.paused = True


@dataclass
class FakeNats:
    """Enough of :class:`emailrelay.bridge.nats.NatsConnection` for the request loop."""

    deliveries: dict[str, Deliver] = field(default_factory=dict)
    subscriptions: dict[str, FakeSubscription] = field(default_factory=dict)
    replies: dict[str, tuple[bytes, Mapping[str, str] | None]] = field(default_factory=dict)
    _arrived: dict[str, anyio.Event] = field(default_factory=dict)

    async def queue_subscribe(self, subject: str, queue: str, deliver: Deliver) -> FakeSubscription:
        self.deliveries[subject] = deliver
        self.subscriptions[subject] = FakeSubscription(subject)
        return self.subscriptions[subject]

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        self.replies[subject] = (data, headers)
        self._arrived.setdefault(subject, anyio.Event()).set()

    def request(self, subject: str, reply: str) -> None:
        request = IncomingRequest(subject, b"{}", {}, reply, self)  # type: ignore[arg-type]
        self.deliveries[subject](request)

    async def answer(self, reply: str) -> tuple[bytes, Mapping[str, str] | None]:
        """The reply published to ``reply``, once it is there."""
        with anyio.fail_after(5):
            await self._arrived.setdefault(reply, anyio.Event()).wait()
        return self.replies[reply]


class Blocked:
    """A handler that holds every request until released."""

    def __init__(self) -> None:
        self.started = 0
        self.running = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, data: bytes, deadline: Deadline, headers: Mapping[str, str]) -> Reply:
        self.started += 1
        self.running.set()
        await self.release.wait()
        return api.SuppressionChangeReply(address="a@example.org", changed=False)


@asynccontextmanager
async def serving(
    nats: FakeNats, routes: dict[str, Handler], **limits: int
) -> AsyncIterator[RequestServer]:
    server = RequestServer(nats, send_timeout=30.0, **limits)  # type: ignore[arg-type]
    await server.add_routes(routes)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, stopping, 5.0)
        yield server
        stopping.set()


def shed(subject: str) -> float:
    value = REGISTRY.get_sample_value("emailrelay_requests_shed_total", {"subject": subject})
    return value or 0.0


async def wait_for(event: anyio.Event) -> None:
    with anyio.fail_after(5):
        await event.wait()


async def test_a_read_beyond_its_budget_answers_overloaded_with_code_503() -> None:
    nats, status = FakeNats(), Blocked()
    async with serving(
        nats, {api.GET_EMAIL_STATUS_SUBJECT: status}, max_in_flight=4, max_reads_in_flight=1
    ):
        nats.request(api.GET_EMAIL_STATUS_SUBJECT, "first")
        await wait_for(status.running)
        nats.request(api.GET_EMAIL_STATUS_SUBJECT, "waits")
        nats.request(api.GET_EMAIL_STATUS_SUBJECT, "shed")
        body, headers = await nats.answer("shed")
        assert json.loads(body) == {"error": "overloaded"}
        assert headers == {"Nats-Service-Error": "overloaded", "Nats-Service-Error-Code": "503"}
        assert "first" not in nats.replies
        status.release.set()
        for reply in ("first", "waits"):
            body, _ = await nats.answer(reply)
            assert "error" not in json.loads(body)
    assert status.started == 2


async def test_a_shed_read_is_counted_by_subject() -> None:
    nats, analytics = FakeNats(), Blocked()
    subject = api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT
    before = shed(subject)
    async with serving(nats, {subject: analytics}, max_in_flight=4, max_reads_in_flight=1):
        nats.request(subject, "first")
        await wait_for(analytics.running)
        nats.request(subject, "waits")
        for n in range(3):
            nats.request(subject, f"shed-{n}")
        for n in range(3):
            await nats.answer(f"shed-{n}")
        analytics.release.set()
        await nats.answer("waits")
    assert shed(subject) - before == 3


async def test_a_finished_read_frees_its_place_in_the_budget() -> None:
    nats, status = FakeNats(), Blocked()
    status.release.set()
    async with serving(
        nats, {api.GET_EMAIL_STATUS_SUBJECT: status}, max_in_flight=4, max_reads_in_flight=1
    ):
        for n in range(3):
            nats.request(api.GET_EMAIL_STATUS_SUBJECT, f"r{n}")
            body, _ = await nats.answer(f"r{n}")
            assert "error" not in json.loads(body)
    assert status.started == 3


async def test_a_full_send_backlog_pauses_sends_but_not_reads() -> None:
    nats, send, status = FakeNats(), Blocked(), Blocked()
    status.release.set()
    routes: dict[str, Handler] = {
        api.SEND_EMAIL_SUBJECT: send,
        api.GET_EMAIL_STATUS_SUBJECT: status,
    }
    async with serving(nats, routes, max_in_flight=1, max_backlog=2, max_reads_in_flight=1):
        for n in range(3):
            nats.request(api.SEND_EMAIL_SUBJECT, f"send-{n}")
        await wait_for(nats.subscriptions[api.SEND_EMAIL_SUBJECT].was_paused)
        assert not nats.subscriptions[api.GET_EMAIL_STATUS_SUBJECT].paused
        nats.request(api.GET_EMAIL_STATUS_SUBJECT, "read")
        body, _ = await nats.answer("read")
        assert "error" not in json.loads(body)
        send.release.set()
        for n in range(3):
            body, _ = await nats.answer(f"send-{n}")
            assert "error" not in json.loads(body)


async def test_sends_past_twice_the_backlog_still_answer_delivery_failed() -> None:
    nats, send = FakeNats(), Blocked()
    async with serving(
        nats, {api.SEND_EMAIL_SUBJECT: send}, max_in_flight=1, max_backlog=1, max_reads_in_flight=1
    ):
        for n in range(4):  # the first two wait (twice the backlog); the rest are shed
            nats.request(api.SEND_EMAIL_SUBJECT, f"send-{n}")
        body, _ = await nats.answer("send-3")
        assert json.loads(body) == {"error": api.ERR_DELIVERY_FAILED}
        send.release.set()
