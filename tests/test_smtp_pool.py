"""SmtpPool over bridge.smtp.SmtpConnection, against the real aiosmtpd servers of the suite.

Trio tests: the ``asyncio_loop`` fixture opens the trio-asyncio loop that
aiosmtplib runs on, as ``emailrelay serve`` does.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from emailrelay.bridge.loop import asyncio_loop as open_asyncio_loop
from emailrelay.bridge.smtp import SmtpConnection, SmtpEndpoint
from emailrelay.config import SmtpTlsMode
from emailrelay.deadline import Deadline, DeadlinePassed
from emailrelay.mail.errors import (
    AmbiguousFailure,
    DailyQuotaFailure,
    MisconfiguredFailure,
    PermanentFailure,
    SendFailure,
)
from emailrelay.mail.pool import Connection, SmtpPool
from emailrelay.mail.rate import TokenBucket
from tests.conftest import TLS_SMTP_PASSWORD, TLS_SMTP_USERNAME
from tests.support.servers.smtp import Command, SmtpServer
from tests.support.waiting import wait_until

SENDER = "noreply@lfx.linuxfoundation.org"
RECIPIENT = "jane@example.com"
MESSAGE = (
    b"From: noreply@lfx.linuxfoundation.org\r\nTo: jane@example.com\r\nSubject: t\r\n\r\nbody\r\n"
)
CREDENTIALS = (TLS_SMTP_USERNAME, TLS_SMTP_PASSWORD)


@pytest.fixture
async def asyncio_loop() -> AsyncIterator[None]:
    """The trio-asyncio loop aiosmtplib needs, open for the test."""
    async with open_asyncio_loop():
        yield


@pytest.fixture
def restartable_smtp() -> Iterator[SmtpServer]:
    """A plain SMTP server of this test's own, free to be stopped and started."""
    with SmtpServer() as server:
        yield server


def restart_outside_trio(server: SmtpServer) -> None:
    """Stop and start ``server`` from a worker thread (its loop cannot be made inside trio)."""
    server.stop()
    server.start()


def endpoint(
    server: SmtpServer,
    *,
    tls_mode: SmtpTlsMode = SmtpTlsMode.NONE,
    credentials: tuple[str, str] | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> SmtpEndpoint:
    return SmtpEndpoint(
        host=server.host,
        port=server.port,
        tls_mode=tls_mode,
        credentials=credentials,
        tls_context=tls_context or ssl.create_default_context(),
        local_hostname="relay.test",
        timeout=5.0,
    )


def make_pool(target: SmtpEndpoint, **options: Any) -> SmtpPool:
    """A pool on ``target`` with quick retries; ``options`` override any argument."""

    async def connect() -> Connection:
        return await SmtpConnection.open(target)

    arguments: dict[str, Any] = {
        "size": 4,
        "max_messages": 1000,
        "max_age": 300.0,
        "send_timeout": 10.0,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
    }
    return SmtpPool(connect, **{**arguments, **options})


async def send(pool: SmtpPool) -> None:
    await pool.send(SENDER, RECIPIENT, MESSAGE)


# delivery and reuse


async def test_message_arrives_with_its_envelope(asyncio_loop: None, smtp: SmtpServer) -> None:
    pool = make_pool(endpoint(smtp))
    await send(pool)
    await pool.aclose()
    (message,) = smtp.messages
    assert (message.mail_from, message.rcpt_tos) == (SENDER, [RECIPIENT])
    assert message.raw == MESSAGE


async def test_sequential_sends_reuse_one_connection(asyncio_loop: None, smtp: SmtpServer) -> None:
    pool = make_pool(endpoint(smtp))
    for _ in range(20):
        await send(pool)
    await pool.aclose()
    assert len(smtp.messages) == 20
    assert smtp.connections == 1


async def test_concurrent_sends_open_at_most_pool_size_connections(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    pool = make_pool(endpoint(smtp), size=4)
    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(send, pool)
    await pool.aclose()
    assert len(smtp.messages) == 40
    assert 1 <= smtp.connections <= 4


async def test_connection_is_recycled_after_max_messages(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    pool = make_pool(endpoint(smtp), max_messages=3)
    for _ in range(7):
        await send(pool)
    await pool.aclose()
    assert smtp.connections == 3


async def test_connection_is_recycled_after_max_age(asyncio_loop: None, smtp: SmtpServer) -> None:
    pool = make_pool(endpoint(smtp), max_age=0.000_001)
    for _ in range(3):
        await send(pool)
    await pool.aclose()
    assert smtp.connections == 3


async def test_aclose_closes_idle_connections(asyncio_loop: None, smtp: SmtpServer) -> None:
    pool = make_pool(endpoint(smtp))
    await send(pool)
    await pool.aclose()
    wait_until(lambda: smtp.open_connections == 0, timeout=5, message="connection still open")
    assert pool.open_connections == 0


async def test_connection_closed_by_the_server_is_replaced(
    asyncio_loop: None, restartable_smtp: SmtpServer
) -> None:
    pool = make_pool(endpoint(restartable_smtp))
    await send(pool)
    await anyio.to_thread.run_sync(restart_outside_trio, restartable_smtp)
    await send(pool)
    await pool.aclose()
    assert len(restartable_smtp.messages) == 2


# reply classes


async def test_4xx_on_data_is_retried_and_delivered_once(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    smtp.fail_next_data(451)
    pool = make_pool(endpoint(smtp))
    await send(pool)
    await pool.aclose()
    assert len(smtp.messages) == 1
    assert len(smtp.rejected) == 1


@pytest.mark.parametrize(("command", "code"), [("MAIL", 421), ("RCPT", 450), ("MAIL", 454)])
async def test_4xx_before_data_is_retried(
    asyncio_loop: None, smtp: SmtpServer, command: Command, code: int
) -> None:
    smtp.fail_next(command, code, count=2)
    pool = make_pool(endpoint(smtp))
    await send(pool)
    await pool.aclose()
    assert len(smtp.messages) == 1


async def test_5xx_on_data_fails_at_once(asyncio_loop: None, smtp: SmtpServer) -> None:
    smtp.fail_next_data(550)
    pool = make_pool(endpoint(smtp))
    with pytest.raises(PermanentFailure) as caught:
        await send(pool)
    await pool.aclose()
    assert caught.value.code == 550
    assert smtp.messages == []
    assert len(smtp.rejected) == 1


async def test_5xx_on_rcpt_fails_at_once(asyncio_loop: None, smtp: SmtpServer) -> None:
    smtp.fail_next_rcpt(550)
    pool = make_pool(endpoint(smtp))
    with pytest.raises(PermanentFailure):
        await send(pool)
    await pool.aclose()
    assert smtp.messages == []


async def test_refusal_reason_does_not_carry_the_recipient_address(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    # SES names the refused address in its reply text; reasons end up in logs.
    smtp.fail_next("RCPT", 554, text=f"Address not verified: {RECIPIENT}")
    pool = make_pool(endpoint(smtp))
    with pytest.raises(PermanentFailure) as caught:
        await send(pool)
    await pool.aclose()
    assert RECIPIENT not in caught.value.reason


async def test_a_failed_connection_is_not_reused(asyncio_loop: None, smtp: SmtpServer) -> None:
    smtp.fail_next_data(550)
    pool = make_pool(endpoint(smtp))
    with pytest.raises(PermanentFailure):
        await send(pool)
    await send(pool)
    await pool.aclose()
    assert smtp.connections == 2
    assert len(smtp.messages) == 1


async def test_persistent_4xx_gives_up_at_send_timeout(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    smtp.fail_all("DATA", 451)
    pool = make_pool(endpoint(smtp), send_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(SendFailure):
        await send(pool)
    await pool.aclose()
    assert time.monotonic() - started < 3
    assert smtp.messages == []


async def test_a_retry_backoff_would_push_past_the_deadline_is_made_before_it(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    # The outage ends after the first attempt; the next backoff step (5-10 s)
    # would end long after the 3 s deadline, so only a shortened one delivers.
    # Asserted on the server's clock: the retry's MAIL came before the deadline
    # (1 s of reserve: a busy machine meets it with margin).
    smtp.fail_next("MAIL", 421)
    pool = make_pool(
        endpoint(smtp), backoff_initial=10.0, backoff_max=10.0, last_attempt_reserve=1.0
    )
    deadline_at = time.time() + 3.0
    await pool.send(SENDER, RECIPIENT, MESSAGE, Deadline.after(3.0))
    await pool.aclose()
    assert len(smtp.messages) == 1
    first, retry = smtp.mail_times
    assert first < retry < deadline_at


async def test_persistent_4xx_with_room_for_one_more_attempt_still_ends_at_the_deadline(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    smtp.fail_all("MAIL", 421)
    pool = make_pool(endpoint(smtp))
    started = time.monotonic()
    with pytest.raises(DeadlinePassed):
        await pool.send(SENDER, RECIPIENT, MESSAGE, Deadline.after(0.5))
    await pool.aclose()
    assert time.monotonic() - started < 2


async def test_drop_after_data_is_ambiguous_and_never_retried(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    smtp.drop_connection_after_data = True
    pool = make_pool(endpoint(smtp))
    with pytest.raises(AmbiguousFailure):
        await send(pool)
    await pool.aclose()
    assert len(smtp.messages) == 1


# TLS and credentials


async def test_starttls_and_auth_in_auto_mode(asyncio_loop: None, tls_smtp: SmtpServer) -> None:
    target = endpoint(
        tls_smtp,
        tls_mode=SmtpTlsMode.AUTO,
        credentials=CREDENTIALS,
        tls_context=tls_smtp.client_ssl_context(),
    )
    pool = make_pool(target)
    await send(pool)
    await pool.aclose()
    (message,) = tls_smtp.messages
    assert message.over_tls
    assert message.auth_login == TLS_SMTP_USERNAME


async def test_starttls_and_auth_in_starttls_mode(asyncio_loop: None, tls_smtp: SmtpServer) -> None:
    target = endpoint(
        tls_smtp,
        tls_mode=SmtpTlsMode.STARTTLS,
        credentials=CREDENTIALS,
        tls_context=tls_smtp.client_ssl_context(),
    )
    pool = make_pool(target)
    await send(pool)
    await pool.aclose()
    assert [m.over_tls for m in tls_smtp.messages] == [True]
    assert [a.over_tls for a in tls_smtp.auth_attempts] == [True]


async def test_implicit_tls_mode_speaks_tls_from_the_first_byte(asyncio_loop: None) -> None:
    with SmtpServer(implicit_tls=True) as smtps:
        pool = make_pool(
            endpoint(smtps, tls_mode=SmtpTlsMode.IMPLICIT, tls_context=smtps.client_ssl_context())
        )
        await send(pool)
        await pool.aclose()
        assert [m.over_tls for m in smtps.messages] == [True]


async def test_untrusted_certificate_fails_at_once(
    asyncio_loop: None, tls_smtp: SmtpServer
) -> None:
    # The system trust store does not know the test CA.
    target = endpoint(tls_smtp, tls_mode=SmtpTlsMode.STARTTLS, credentials=CREDENTIALS)
    pool = make_pool(target, send_timeout=10)
    started = time.monotonic()
    with pytest.raises(PermanentFailure, match="TLS"):
        await send(pool)
    await pool.aclose()
    assert time.monotonic() - started < 3
    assert tls_smtp.messages == []
    assert tls_smtp.auth_attempts == []


async def test_wrong_password_fails_at_once(asyncio_loop: None, tls_smtp: SmtpServer) -> None:
    target = endpoint(
        tls_smtp,
        tls_mode=SmtpTlsMode.STARTTLS,
        credentials=(TLS_SMTP_USERNAME, "wrong"),
        tls_context=tls_smtp.client_ssl_context(),
    )
    pool = make_pool(target)
    with pytest.raises(PermanentFailure, match="authentication"):
        await send(pool)
    await pool.aclose()
    assert tls_smtp.messages == []


async def test_credentials_are_never_sent_without_tls(
    asyncio_loop: None, clear_auth_smtp: SmtpServer
) -> None:
    pool = make_pool(endpoint(clear_auth_smtp, tls_mode=SmtpTlsMode.AUTO, credentials=CREDENTIALS))
    with pytest.raises(PermanentFailure, match="without TLS"):
        await send(pool)
    await pool.aclose()
    assert clear_auth_smtp.auth_attempts == []
    assert clear_auth_smtp.messages == []


async def test_tls_mode_none_allows_credentials_in_clear(
    asyncio_loop: None, clear_auth_smtp: SmtpServer
) -> None:
    pool = make_pool(endpoint(clear_auth_smtp, tls_mode=SmtpTlsMode.NONE, credentials=CREDENTIALS))
    await send(pool)
    await pool.aclose()
    assert [(a.over_tls, a.succeeded) for a in clear_auth_smtp.auth_attempts] == [(False, True)]
    assert len(clear_auth_smtp.messages) == 1


async def test_credentials_for_a_server_without_auth_fail_at_once_and_are_not_retried(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    pool = make_pool(endpoint(smtp, credentials=CREDENTIALS))
    with pytest.raises(MisconfiguredFailure, match=f"SMTP_USERNAME is set but {smtp.host}"):
        await send(pool)
    await pool.aclose()
    assert smtp.connections == 1
    assert smtp.messages == []


async def test_a_server_without_auth_is_logged_once_without_the_credentials(
    asyncio_loop: None, smtp: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(endpoint(smtp, credentials=CREDENTIALS))
    for _ in range(3):
        with pytest.raises(MisconfiguredFailure):
            await send(pool)
    await pool.aclose()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "SMTP_USERNAME" in errors[0]
    assert smtp.host in errors[0]
    assert not [r for r in caplog.records if CREDENTIALS[0] in r.getMessage()]
    assert not [r for r in caplog.records if CREDENTIALS[1] in r.getMessage()]
    assert pool.misconfiguration is not None


async def test_the_misconfiguration_clears_once_a_connection_logs_in(
    asyncio_loop: None, smtp: SmtpServer, clear_auth_smtp: SmtpServer
) -> None:
    # The operator points the relay at a server that authenticates.
    servers = [smtp]

    async def connect() -> Connection:
        return await SmtpConnection.open(endpoint(servers[-1], credentials=CREDENTIALS))

    pool = SmtpPool(connect, size=1, max_messages=1000, max_age=300.0, send_timeout=10.0)
    with pytest.raises(MisconfiguredFailure):
        await send(pool)
    servers.append(clear_auth_smtp)
    await send(pool)
    await pool.aclose()
    assert pool.misconfiguration is None


async def test_starttls_mode_refuses_a_server_without_starttls(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    pool = make_pool(endpoint(smtp, tls_mode=SmtpTlsMode.STARTTLS))
    with pytest.raises(PermanentFailure, match="does not offer"):
        await send(pool)
    await pool.aclose()
    assert smtp.messages == []


async def test_auto_mode_without_credentials_sends_in_clear_when_no_starttls(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    pool = make_pool(endpoint(smtp, tls_mode=SmtpTlsMode.AUTO))
    await send(pool)
    await pool.aclose()
    assert [m.over_tls for m in smtp.messages] == [False]


@pytest.mark.parametrize(
    ("tls_mode", "port", "implicit"),
    [
        (SmtpTlsMode.AUTO, 465, True),
        (SmtpTlsMode.AUTO, 2465, True),
        (SmtpTlsMode.AUTO, 587, False),
        (SmtpTlsMode.AUTO, 25, False),
        (SmtpTlsMode.IMPLICIT, 587, True),
        (SmtpTlsMode.STARTTLS, 465, False),
        (SmtpTlsMode.NONE, 465, False),
    ],
)
def test_auto_tls_mode_is_implicit_only_on_the_smtps_ports(
    tls_mode: SmtpTlsMode, port: int, implicit: bool
) -> None:
    target = SmtpEndpoint(
        host="127.0.0.1",
        port=port,
        tls_mode=tls_mode,
        credentials=None,
        tls_context=ssl.create_default_context(),
        local_hostname="relay.test",
        timeout=5.0,
    )
    assert target.implicit_tls is implicit


# the request's deadline


async def test_nothing_starts_once_the_deadline_has_passed(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    pool = make_pool(endpoint(smtp))
    with pytest.raises(DeadlinePassed):
        await pool.send(SENDER, RECIPIENT, MESSAGE, Deadline.after(-1))
    await pool.aclose()
    assert (smtp.connections, smtp.mail_times) == (0, [])


async def test_acceptance_after_the_deadline_passed_during_data_counts_as_sent(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    smtp.latency = 1.0  # the final reply to DATA comes after the deadline
    pool = make_pool(endpoint(smtp))
    await pool.send(SENDER, RECIPIENT, MESSAGE, Deadline.after(0.3))
    await pool.aclose()
    assert len(smtp.messages) == 1


# the SMTP phase, provider rate (issue 11)


async def test_send_timeout_after_data_began_is_ambiguous(
    asyncio_loop: None, smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("emailrelay.bridge.smtp.DATA_REPLY_WAIT", 0.1)
    smtp.latency = 1.5  # no final reply before SEND_TIMEOUT and the wait for it
    pool = make_pool(endpoint(smtp), send_timeout=0.3)
    with pytest.raises(AmbiguousFailure):
        await send(pool)
    await pool.aclose()


async def test_send_timeout_before_data_is_a_plain_failure(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    smtp.fail_all("MAIL", 451)
    pool = make_pool(endpoint(smtp), send_timeout=0.3)
    with pytest.raises(SendFailure) as caught:
        await send(pool)
    await pool.aclose()
    assert not isinstance(caught.value, AmbiguousFailure)


@dataclass
class RecordingRate:
    throttles: int = 0
    acceptances: int = 0

    def throttled(self, now: float) -> None:
        self.throttles += 1

    def accepted(self, now: float) -> None:
        self.acceptances += 1


def rate_pool(smtp: SmtpServer, **options: Any) -> SmtpPool:
    return make_pool(endpoint(smtp), size=2, **options)


async def test_throttling_replies_are_retried_and_reported_to_the_rate(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    smtp.fail_next("MAIL", 454, 2, text="Throttling failure: Maximum sending rate exceeded")
    rate = RecordingRate()
    pool = rate_pool(smtp, rate=rate)
    await send(pool)
    await pool.aclose()
    assert (rate.throttles, rate.acceptances) == (2, 1)
    assert len(smtp.messages) == 1


async def test_daily_quota_fails_at_once(asyncio_loop: None, smtp: SmtpServer) -> None:
    smtp.fail_all("MAIL", 454, text="Throttling failure: Daily message quota exceeded.")
    pool = rate_pool(smtp)
    with pytest.raises(DailyQuotaFailure):
        await send(pool)
    await pool.aclose()
    assert len(smtp.mail_times) == 1


async def test_paced_send_that_would_wait_past_its_deadline_starts_nothing(
    asyncio_loop: None, smtp: SmtpServer
) -> None:
    pool = rate_pool(smtp, pacer=TokenBucket(1.0, burst=1.0, now=anyio.current_time()))
    await pool.send(SENDER, RECIPIENT, MESSAGE, Deadline.after(5))
    with pytest.raises(DeadlinePassed):
        await pool.send(SENDER, RECIPIENT, MESSAGE, Deadline.after(0.3))
    await pool.aclose()
    assert len(smtp.mail_times) == 1
