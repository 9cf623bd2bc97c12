"""Sending no faster than the provider allows, and slower while it says so.

SES enforces a per-account rate (messages per second) and answers
``454 Throttling failure: Maximum sending rate exceeded`` above it; every
message refused that way costs a round trip and a retry. So each process
paces itself with a token bucket (``SMTP_MAX_SEND_RATE``: the account's
quota divided by the replica count, so the sum stays under it), and an
adaptive controller lowers that rate when the provider throttles anyway
(multiplicatively: the quota is shared, other senders may be using it) and
raises it again slowly after clean replies (additively: probing upwards
without overshooting), never above the configured maximum. This is the
AIMD scheme TCP uses for the same reason.

All the arithmetic takes the time as an argument (pure, tested with a fake
clock); only :meth:`TokenBucket.acquire` waits, on anyio's clock (trio's
``MockClock`` in tests).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import anyio

from emailrelay.deadline import DeadlinePassed

# --- Classifying replies ---------------------------------------------------------


@dataclass(frozen=True)
class Throttled:
    """The provider refused the message for sending too fast: back off,
    retry within the deadline, and lower the rate."""

    code: int
    message: str


@dataclass(frozen=True)
class DailyQuotaExceeded:
    """The account's 24-hour quota is used up: no retry today can succeed,
    so the send fails at once (``email delivery failed``)."""

    code: int
    message: str


_DAILY_QUOTA = re.compile(r"daily\s+(message|sending)\s+quota\s+exceeded", re.IGNORECASE)
_THROTTLING = re.compile(
    r"throttl|rate\s+(limit|exceeded)|sending\s+rate|too\s+many\s+(messages|emails|requests)"
    r"|unusual\w*\s+(high\s+)?rate",
    re.IGNORECASE,
)


def classify_throttle(code: int, message: str) -> Throttled | DailyQuotaExceeded | None:
    """What an SMTP reply says about sending rate; ``None``: nothing.

    The daily quota is checked first because SES words it as a throttling
    failure too (``454 Throttling failure: Daily message quota exceeded``).
    Throttling is only ever a 4xx reply (a 5xx is permanent whatever its
    text); the texts are those of SES, Gmail, Microsoft 365 and Postfix
    rate limits."""
    if _DAILY_QUOTA.search(message):
        return DailyQuotaExceeded(code, message)
    if 400 <= code < 500 and _THROTTLING.search(message):
        return Throttled(code, message)
    return None


# --- Pacing ----------------------------------------------------------------------


class TokenBucket:
    """At most ``rate`` sends per second on average, bursts of ``burst``.

    ``rate`` 0 means unlimited. A send that has to wait books its token at
    once (the count may go below zero), so concurrent senders queue in the
    order they asked and none is starved; a waiter that is cancelled gives
    its token back."""

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        self._rate = rate
        self._burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self._burst
        self._updated = now

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate from ``now`` on (tokens earned so far are kept)."""
        self._refill(now)
        self._rate = rate

    def take(self, now: float, until: float = math.inf) -> float | None:
        """Book one token; the seconds to wait before using it, or ``None``
        (nothing booked) when it would not be there by ``until``."""
        if self._rate <= 0:
            return 0.0
        self._refill(now)
        wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate
        if now + wait > until:
            return None
        self._tokens -= 1
        return wait

    def give_back(self) -> None:
        """Return a booked token that was not used."""
        self._tokens = min(self._burst, self._tokens + 1)

    async def acquire(self, until: float) -> None:
        """Wait for a token, but never past ``until`` (on
        :func:`anyio.current_time`'s clock): when the token would come later
        it raises :class:`~emailrelay.deadline.DeadlinePassed` at once, as a
        send that reached its deadline does, so the caller answers alike and
        no time is spent waiting for nothing."""
        wait = self.take(anyio.current_time(), until)
        if wait is None:
            raise DeadlinePassed("no send slot before the deadline (SMTP_MAX_SEND_RATE)")
        if wait <= 0:
            return
        try:
            await anyio.sleep(wait)
        except BaseException:
            self.give_back()
            raise

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._updated = max(self._updated, now)
        if self._rate > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)


class AdaptiveRate:
    """Moves a :class:`TokenBucket`'s rate with the provider's replies (AIMD).

    On a throttling reply the rate is multiplied by ``decrease`` (halved), at
    most once per ``cooldown`` seconds: the replies to sends already in flight
    at the first 454 say the same thing again and must not halve it a dozen
    times. After ``increase_every`` seconds without a throttling reply, each
    clean reply adds ``increase`` messages/s, up to ``max_rate``; from half
    the maximum that takes about ``increase_every * max_rate / (2 *
    increase)`` seconds (10 s with the defaults). Never below ``min_rate``.

    With ``max_rate`` 0 (unlimited) there is no ceiling to return to, so the
    controller does nothing: throttling replies are still retried by the
    caller, and operators set ``SMTP_MAX_SEND_RATE`` to get adaptation.
    """

    def __init__(
        self,
        bucket: TokenBucket,
        max_rate: float,
        *,
        min_rate: float = 0.1,
        decrease: float = 0.5,
        increase: float | None = None,
        increase_every: float = 1.0,
        cooldown: float = 1.0,
    ) -> None:
        self._bucket = bucket
        self._max = max_rate
        self._min = min(min_rate, max_rate)
        self._decrease = decrease
        self._increase = increase if increase is not None else max(max_rate / 20, 0.05)
        self._increase_every = increase_every
        self._cooldown = cooldown
        self._last_change = -math.inf

    @property
    def rate(self) -> float:
        return self._bucket.rate

    def throttled(self, now: float) -> None:
        """The provider answered with a throttling reply."""
        if self._max <= 0 or now - self._last_change < self._cooldown:
            return
        self._bucket.set_rate(max(self._min, self._bucket.rate * self._decrease), now)
        self._last_change = now

    def accepted(self, now: float) -> None:
        """The provider accepted a message without throttling."""
        if self._max <= 0 or self._bucket.rate >= self._max:
            return
        if now - self._last_change < self._increase_every:
            return
        self._bucket.set_rate(min(self._max, self._bucket.rate + self._increase), now)
        self._last_change = now
