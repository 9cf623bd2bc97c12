"""The SMTP sender pool: a bounded set of persistent connections.

Connections open lazily, are reused across messages, are replaced after any
failure, and are recycled after ``max_messages`` messages or ``max_age``
seconds (Amazon SES recommends not holding one connection for long). Transient
failures are retried with jittered exponential backoff until the per-send
deadline; permanent and ambiguous ones are not. A backoff step that would
sleep past the deadline is shortened so that one last attempt starts
``last_attempt_reserve`` seconds before it: an outage that ends while the
caller still waits costs that caller nothing.

The per-send deadline is the earlier of ``send_timeout`` and the request's
own (:class:`~emailrelay.deadline.Deadline`): no transaction, and no retry,
starts after it. A message whose DATA phase began before it still gets the
provider's answer (see emailrelay.bridge.smtp), and that answer counts. When
no answer came (the deadline or ``SEND_TIMEOUT`` fired during or after DATA)
the outcome is unknown: :class:`AmbiguousFailure`, never a plain failure, so
an idempotent send holds its key (emailrelay.store.idempotency).

Provider rate (emailrelay.mail.rate): with a ``pacer`` every attempt, retries
included, waits for a token first, never past the deadline; throttling
replies are retried like any 4xx and reported to the ``rate`` controller,
which lowers the pace; a daily quota reply fails at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from emailrelay.deadline import Deadline, DeadlinePassed
from emailrelay.mail.errors import (
    AmbiguousFailure,
    DailyQuotaFailure,
    MisconfiguredFailure,
    PermanentFailure,
    SendFailure,
    TransientFailure,
)
from emailrelay.mail.rate import DailyQuotaExceeded, Throttled, TokenBucket, classify_throttle
from emailrelay.metrics import (
    SMTP_CONNECTIONS,
    SMTP_DAILY_QUOTA_EXCEEDED,
    SMTP_REPLIES,
    SMTP_SEND_RATE,
    SMTP_SEND_SECONDS,
    SMTP_THROTTLED,
)
from emailrelay.supervision import Backoff

log = logging.getLogger(__name__)


class Connection(Protocol):
    @property
    def data_started(self) -> bool:
        """Whether the last :meth:`send` reached DATA (the provider may then
        have the message, whatever happened next)."""
        ...

    async def send(self, sender: str, recipient: str, message: bytes) -> str | None:
        """Deliver, or raise :class:`SendFailure`; the provider's message id
        when it named one."""
        ...

    async def close(self) -> None: ...
    def abort(self) -> None: ...


class RateObserver(Protocol):
    """What the provider's replies say about the pace
    (:class:`~emailrelay.mail.rate.AdaptiveRate`)."""

    def throttled(self, now: float) -> None: ...
    def accepted(self, now: float) -> None: ...


@dataclass
class _Outcome:
    """Set the moment the provider accepts, so that a cancellation arriving
    just after cannot turn a delivered message into a failure; and the moment
    DATA starts, so that a timeout from then on is reported as ambiguous."""

    accepted: bool = False
    handed_over: bool = False
    message_id: str | None = None


@dataclass
class _Pooled:
    connection: Connection
    opened_at: float
    messages: int = field(default=0)


class SmtpPool:
    def __init__(
        self,
        connect: Callable[[], Awaitable[Connection]],
        size: int,
        max_messages: int,
        max_age: float,
        send_timeout: float,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        pacer: TokenBucket | None = None,
        rate: RateObserver | None = None,
        last_attempt_reserve: float = 1.0,
        transport: str = "smtp",
    ) -> None:
        self._connect = connect
        self._transport = transport
        self._slots = anyio.Semaphore(size)
        self._idle: list[_Pooled] = []
        self._max_messages = max_messages
        self._max_age = max_age
        self._send_timeout = send_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._pacer = pacer
        self._rate = rate
        self._last_attempt_reserve = last_attempt_reserve
        self.open_connections = 0
        self.misconfiguration: str | None = None
        """Why the last connection could not be used whatever the message
        (:class:`MisconfiguredFailure`, e.g. credentials for a server without
        AUTH); ``None`` once a connection is opened again."""

    async def send(
        self, sender: str, recipient: str, message: bytes, deadline: Deadline | None = None
    ) -> str | None:
        """Deliver one message, or raise :class:`SendFailure`; the provider's
        message id when it named one.

        The whole call, retries included, ends at ``send_timeout`` or at
        ``deadline``, whichever comes first."""
        deadline = deadline or Deadline.never()
        outcome = _Outcome()
        with deadline.scope(), anyio.move_on_after(self._send_timeout):
            await self._send_with_retries(sender, recipient, message, outcome)
        if outcome.accepted:
            return outcome.message_id
        if outcome.handed_over:
            raise AmbiguousFailure(
                "no final reply before the deadline or SEND_TIMEOUT, after DATA began"
            )
        if deadline.expired:
            raise DeadlinePassed("the request's deadline passed before the provider accepted it")
        raise SendFailure(f"no success within SEND_TIMEOUT ({self._send_timeout:g}s)")

    async def _send_with_retries(
        self, sender: str, recipient: str, message: bytes, outcome: _Outcome
    ) -> None:
        # Jittered, so a burst of retries does not hit the server in step.
        backoff = Backoff(self._backoff_initial, self._backoff_max)
        attempt = 0
        while True:
            if self._pacer is not None:
                # Within the cancel scope of send(): its deadline is the send's.
                await self._pacer.acquire(anyio.current_effective_deadline())
            try:
                await self._send_once(sender, recipient, message, outcome)
            except TransientFailure as exc:
                verdict = classify_throttle(exc.code or 0, exc.reason)
                if isinstance(verdict, DailyQuotaExceeded):
                    raise self._daily_quota(exc) from exc
                if isinstance(verdict, Throttled):
                    SMTP_THROTTLED.labels(self._transport).inc()
                    if self._rate is not None:
                        self._rate.throttled(anyio.current_time())
                        self._show_rate()
                    log.info(
                        "%s: throttled by the provider; retrying",
                        self._transport,
                        extra={"reason": exc.reason},
                    )
                else:
                    log.info(
                        "%s: transient failure; retrying",
                        self._transport,
                        extra={"reason": exc.reason},
                    )
            except PermanentFailure as exc:
                if isinstance(classify_throttle(exc.code or 0, exc.reason), DailyQuotaExceeded):
                    raise self._daily_quota(exc) from exc
                raise
            else:
                if self._rate is not None:
                    self._rate.accepted(anyio.current_time())
                    self._show_rate()
                return
            attempt += 1
            await anyio.sleep(self._retry_delay(backoff, attempt))

    def _retry_delay(self, backoff: Backoff, attempt: int) -> float:
        delay = backoff.delay(attempt)
        # Within the cancel scope of send(): its deadline is the send's. Once
        # the last attempt has been made, room is gone and the full delay
        # applies, so this never turns into a busy loop.
        room = anyio.current_effective_deadline() - anyio.current_time()
        room -= self._last_attempt_reserve
        return min(delay, room) if room > 0 else delay

    async def _send_once(
        self, sender: str, recipient: str, message: bytes, outcome: _Outcome
    ) -> None:
        async with self._slots:
            pooled = await self._checkout()
            try:
                # No transaction starts once the deadline has passed, however
                # the wait for a slot or a connection went.
                await anyio.lowlevel.checkpoint_if_cancelled()
            except BaseException:
                self._idle.append(pooled)
                raise
            started = time.monotonic()
            try:
                outcome.message_id = await pooled.connection.send(sender, recipient, message)
                outcome.accepted = True
            except AmbiguousFailure as exc:
                self._count_reply(_failure_class(exc))
                outcome.handed_over = True
                await self._discard(pooled)
                raise
            except SendFailure as exc:
                self._count_reply(_failure_class(exc))
                await self._discard(pooled)
                raise
            except BaseException:
                # Cancelled mid-transaction (deadline, shutdown): the
                # connection's state is unknown, so it must not be reused.
                # From DATA on, the provider may have the message.
                outcome.handed_over = outcome.handed_over or pooled.connection.data_started
                pooled.connection.abort()
                self._count_closed()
                raise
            SMTP_SEND_SECONDS.labels(self._transport).observe(time.monotonic() - started)
            self._count_reply("ok")
            pooled.messages += 1
            if self._worn_out(pooled):
                await self._discard(pooled)
            else:
                self._idle.append(pooled)

    async def _checkout(self) -> _Pooled:
        while self._idle:
            pooled = self._idle.pop()
            if not self._worn_out(pooled):
                return pooled
            await self._discard(pooled)
        try:
            connection = await self._connect()
        except SendFailure as exc:
            self._count_reply(_failure_class(exc))
            if isinstance(exc, MisconfiguredFailure):
                if self.misconfiguration is None:
                    # Once, not per send: every send fails alike until fixed.
                    log.error("%s: %s", self._transport, exc.reason)
                self.misconfiguration = exc.reason
            raise
        if self.misconfiguration is not None:
            log.info("smtp: connected again; the SMTP settings fit the server now")
            self.misconfiguration = None
        self.open_connections += 1
        SMTP_CONNECTIONS.labels(self._transport).inc()
        return _Pooled(connection, opened_at=time.monotonic())

    def _worn_out(self, pooled: _Pooled) -> bool:
        too_old = time.monotonic() - pooled.opened_at >= self._max_age
        return too_old or pooled.messages >= self._max_messages

    def _count_closed(self) -> None:
        self.open_connections -= 1
        SMTP_CONNECTIONS.labels(self._transport).dec()

    async def _discard(self, pooled: _Pooled) -> None:
        self._count_closed()
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await pooled.connection.close()

    def _count_reply(self, result: str) -> None:
        SMTP_REPLIES.labels(result=result, transport=self._transport).inc()

    def _daily_quota(self, failure: SendFailure) -> DailyQuotaFailure:
        SMTP_DAILY_QUOTA_EXCEEDED.labels(self._transport).inc()
        log.error(
            "%s: the provider's daily message quota is exceeded; failing sends until it resets",
            self._transport,
            extra={"reason": failure.reason},
        )
        return DailyQuotaFailure(failure.reason, failure.code)

    def _show_rate(self) -> None:
        if self._pacer is not None:
            SMTP_SEND_RATE.set(self._pacer.rate)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for pooled in idle:
            await self._discard(pooled)


def _failure_class(failure: SendFailure) -> str:
    if isinstance(failure, TransientFailure):
        return "transient"
    if isinstance(failure, AmbiguousFailure):
        return "ambiguous"
    return "permanent"
