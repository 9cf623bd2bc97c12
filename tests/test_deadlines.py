"""No work for callers that left: the ``Emailrelay-Deadline`` header.

Unit tests of the header's reading first (pure logic), then the relay end to
end against real servers: a send already past its deadline is not sent, no
SMTP transaction starts after a deadline, and without the header the
deadline is receipt + SEND_TIMEOUT. Last, the client and the CLI send it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import nats
import pytest
import trio
from nats.aio.msg import Msg

from emailrelay import api
from emailrelay.bridge.loop import AsyncioCalls
from emailrelay.client import EmailRelayClient
from emailrelay.deadline import CLOCK_SKEW_ALLOWANCE, Deadline, request_deadline
from tests.conftest import RelayFactory
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import REPO_ROOT
from tests.support.servers.smtp import SmtpServer

DELIVERY_FAILED = {"error": api.ERR_DELIVERY_FAILED}
EXPIRED = "emailrelay_requests_expired_total"


def deadline_header(seconds_from_now: float) -> dict[str, str]:
    return {api.DEADLINE_HEADER: str(int((time.time() + seconds_from_now) * 1000))}


# --- reading the header ----------------------------------------------------------


def test_without_the_header_the_deadline_is_receipt_plus_the_limit() -> None:
    deadline = request_deadline({}, received_at=100.0, received_wall=5000.0, limit=30.0)
    assert deadline.at == 130.0


def test_the_callers_deadline_counts_less_the_skew_allowance() -> None:
    headers = {api.DEADLINE_HEADER: "5010000"}  # 10 s after receipt, in ms
    deadline = request_deadline(headers, received_at=100.0, received_wall=5000.0, limit=30.0)
    assert deadline.at == pytest.approx(110.0 - CLOCK_SKEW_ALLOWANCE)


def test_a_callers_deadline_beyond_the_limit_is_capped_at_the_limit() -> None:
    headers = {api.DEADLINE_HEADER: "5100000"}
    deadline = request_deadline(headers, received_at=100.0, received_wall=5000.0, limit=30.0)
    assert deadline.at == 130.0


@pytest.mark.parametrize("value", ["", "soon", "12.5", "-1", "١٢٣", "9" * 40])
def test_a_header_that_is_not_whole_milliseconds_is_ignored(value: str) -> None:
    headers = {api.DEADLINE_HEADER: value}
    deadline = request_deadline(headers, received_at=100.0, received_wall=5000.0, limit=30.0)
    assert deadline.at == 130.0


async def test_cut_off_ends_the_scopes_opened_on_a_deadline() -> None:
    deadline = Deadline.after(60)
    async with anyio.create_task_group() as tg:

        async def work(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with deadline.scope():
                task_status.started()
                await anyio.sleep_forever()

        await tg.start(work)  # returns once the scope is open
        deadline.cut_off()
    assert deadline.expired


# --- the relay ------------------------------------------------------------------


def test_send_past_its_deadline_fails_without_contacting_smtp(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    relay = relay_factory()
    reply = nats_client.request_json(
        api.SEND_EMAIL_SUBJECT, send_request(), headers=deadline_header(-1.0)
    )
    assert reply == DELIVERY_FAILED
    assert smtp.connections == 0
    assert relay.metric(EXPIRED) == 1


def test_no_smtp_transaction_starts_after_the_deadline(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    smtp.fail_all("MAIL", 451)  # transient: the relay retries, with backoff
    relay = relay_factory()
    header = deadline_header(2.0)
    deadline = int(header[api.DEADLINE_HEADER]) / 1000
    reply = nats_client.request_json(
        api.SEND_EMAIL_SUBJECT, send_request(), timeout=5, headers=header
    )
    assert reply == DELIVERY_FAILED
    assert len(smtp.mail_times) >= 2, "the relay did not retry"
    assert max(smtp.mail_times) < deadline
    assert relay.metric(EXPIRED) == 1


def test_without_the_header_no_transaction_starts_after_send_timeout(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    smtp.fail_all("MAIL", 451)
    relay = relay_factory({"SEND_TIMEOUT": "2s"})
    sent_at = time.time()
    reply = nats_client.request_json(api.SEND_EMAIL_SUBJECT, send_request(), timeout=10)
    assert reply == DELIVERY_FAILED
    assert len(smtp.mail_times) >= 2, "the relay did not retry"
    assert max(smtp.mail_times) < sent_at + 2.0
    assert relay.metric(EXPIRED) == 1


# --- callers of the replaced relay: no header, a 10 s timeout ------------------

REPLY_BY = 9.5
"""With the default SEND_TIMEOUT (8 s), every reply leaves by receipt + 9.5 s."""


def timed_request(
    nats_client: SyncNats, body: dict[str, str], timeout: float = 10.0
) -> tuple[float, Any]:
    sent_at = time.perf_counter()
    reply = nats_client.request_json(api.SEND_EMAIL_SUBJECT, body, timeout=timeout)
    return time.perf_counter() - sent_at, reply


def test_without_the_header_a_data_reply_that_never_comes_answers_failed_before_ten_seconds(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    relay_factory()  # SEND_TIMEOUT's default
    smtp.latency = 30.0  # the final reply to DATA does not come in time
    took, reply = timed_request(nats_client, send_request())
    assert reply == DELIVERY_FAILED
    assert took <= REPLY_BY


def test_without_the_header_a_keyed_data_reply_that_never_comes_answers_outcome_unknown(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    relay_factory()
    smtp.latency = 30.0
    body = {**send_request(), "idempotency_key": f"late-data-{time.monotonic_ns()}"}
    took, reply = timed_request(nats_client, body)
    assert reply == {"error": api.ERR_DELIVERY_OUTCOME_UNKNOWN}
    assert took <= REPLY_BY


def test_without_the_header_a_send_that_ends_at_the_deadline_still_succeeds_in_time(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    relay_factory()
    smtp.latency = 8.2  # the provider accepts just after the 8 s deadline
    took, reply = timed_request(nats_client, send_request())
    assert "email_id" in reply
    assert took <= REPLY_BY


def test_send_within_its_deadline_is_sent(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    relay = relay_factory()
    reply = nats_client.request_json(
        api.SEND_EMAIL_SUBJECT, send_request(), headers=deadline_header(10)
    )
    assert "email_id" in reply
    assert len(smtp.messages) == 1
    assert relay.metric(EXPIRED) == 0


# --- callers send the header ----------------------------------------------------


@asynccontextmanager
async def recording_responder(url: str, subject: str) -> AsyncIterator[list[Msg]]:
    """A plain nats-py responder (under trio) that records each request and answers `{}`."""
    received: list[Msg] = []

    async def answer(msg: Msg) -> None:
        received.append(msg)
        await msg.respond(b'{"email_id": "e", "group_id": "g"}')

    calls = AsyncioCalls()
    await calls.open()
    try:
        nc = await calls(nats.connect, url)
        try:
            await calls(nc.subscribe, subject, cb=answer)
            await calls(nc.flush)
            yield received
        finally:
            await calls(nc.close)
    finally:
        await calls.close()


def deadline_of(msg: Msg) -> float:
    return int((msg.headers or {})[api.DEADLINE_HEADER]) / 1000


async def test_client_sends_now_plus_its_timeout_as_the_deadline(
    nats_server: NatsServer,
) -> None:
    subject = f"deadline-client-{time.monotonic_ns()}"
    async with (
        recording_responder(nats_server.url, subject) as received,
        EmailRelayClient.connect(nats_server.url, timeout=7) as client,
    ):
        before = time.time()
        await client.request(subject, {})
        after = time.time()
    (msg,) = received
    assert before + 7 <= deadline_of(msg) + 0.001
    assert deadline_of(msg) <= after + 7


async def test_cli_sends_now_plus_its_timeout_as_the_deadline(nats_server: NatsServer) -> None:
    async with recording_responder(nats_server.url, api.SEND_EMAIL_SUBJECT) as received:
        before = time.time()
        done = await trio.run_process(
            [
                sys.executable,
                "-m",
                "emailrelay",
                "send",
                "--server",
                nats_server.url,
                "--timeout",
                "9",
                "--to",
                "a@example.com",
                "--subject",
                "s",
                "--text",
                "t",
                "--html",
                "<p>t</p>",
            ],
            cwd=REPO_ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        after = time.time()
    assert done.returncode == 0, done.stderr
    (msg,) = received
    assert before + 9 <= deadline_of(msg) + 0.001
    assert deadline_of(msg) <= after + 9
