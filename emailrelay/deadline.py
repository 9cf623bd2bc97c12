"""When a request's caller stops waiting, and the cancel scopes that honour it.

A caller says when it gives up with the ``Emailrelay-Deadline`` header
(absolute Unix time in ms, :data:`emailrelay.api.DEADLINE_HEADER`); without
it the relay allows ``SEND_TIMEOUT`` from receipt. The deadline is turned into
this process's monotonic clock once, at receipt, so a wall-clock step later
changes nothing.

Work done for a request runs in :meth:`Deadline.scope`, so one call,
:meth:`Deadline.cut_off`, ends all of it at once (the shutdown grace expiring,
the NATS connection lost for good) without cancelling the code that must
still reply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import anyio

from emailrelay import api
from emailrelay.mail.errors import SendFailure

CLOCK_SKEW_ALLOWANCE = 0.5
"""Seconds the relay takes off a caller's deadline. A relay clock up to this
much behind the caller's (NTP keeps hosts within milliseconds), plus the time
the reply takes to travel back, still never has the relay start an SMTP
transaction after the caller gave up. A relay clock ahead of the caller's only
makes it give up early: the caller then gets ``email delivery failed`` for a
message that was never sent, which is safe to retry."""


class DeadlinePassed(SendFailure):
    """The request's deadline passed before the provider accepted the message
    (nothing was handed over, or the provider had not answered)."""


class Deadline:
    """A point on the monotonic clock after which work for a request is pointless."""

    def __init__(self, at: float) -> None:
        self._at = at
        self._scopes: set[anyio.CancelScope] = set()

    @classmethod
    def never(cls) -> Deadline:
        return cls(math.inf)

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @property
    def at(self) -> float:
        """The deadline on :func:`time.monotonic`'s clock."""
        return self._at

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self._at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

    @contextmanager
    def scope(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that ends at the deadline, or at :meth:`cut_off`."""
        scope = anyio.CancelScope(deadline=anyio.current_time() + self.remaining())
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def cut_off(self) -> None:
        """Move the deadline to now and end every scope opened on it."""
        self._at = min(self._at, time.monotonic())
        for scope in list(self._scopes):
            scope.cancel()


def request_deadline(
    headers: Mapping[str, str],
    received_at: float,
    received_wall: float,
    limit: float,
) -> Deadline:
    """The deadline of a request received at ``received_at`` (monotonic) /
    ``received_wall`` (Unix time): the caller's own, less
    :data:`CLOCK_SKEW_ALLOWANCE`, and never later than ``limit`` seconds after
    receipt. A header that is not a whole number of milliseconds is ignored
    (as if absent): a caller's formatting mistake must not fail its sends."""
    latest = received_at + limit
    caller_ms = _parse_ms(headers.get(api.DEADLINE_HEADER))
    if caller_ms is None:
        return Deadline(latest)
    caller_left = caller_ms / 1000 - received_wall - CLOCK_SKEW_ALLOWANCE
    return Deadline(min(latest, received_at + caller_left))


def _parse_ms(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 16:
        return None
    return int(value)
