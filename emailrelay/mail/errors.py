"""How a send failed, which decides whether it may be tried again."""

from __future__ import annotations


class SendFailure(Exception):
    """The provider did not accept the message."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class TransientFailure(SendFailure):
    """Nothing was accepted and trying again may work: a 4xx reply, a refused
    or dropped connection before the message was handed over."""


class PermanentFailure(SendFailure):
    """A 5xx reply, failed authentication, or a TLS/credentials policy that
    forbids sending: trying again would fail the same way."""


class MisconfiguredFailure(PermanentFailure):
    """The relay's own settings do not fit the server (credentials set for a
    server that offers no AUTH): every send fails the same way until an
    operator changes them, so none is retried."""


class AmbiguousFailure(SendFailure):
    """The whole message was handed over but no final reply came (connection
    dropped, timeout): it may have been delivered, so it is never retried."""


class DailyQuotaFailure(PermanentFailure):
    """The provider's daily message quota is used up: no retry today can
    succeed (SES words it as a 454 throttling reply, so it must be told
    apart from a retryable one)."""
