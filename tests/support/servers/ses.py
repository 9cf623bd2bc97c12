"""A scripted SES v2 endpoint: :class:`~emailrelay.dev.sesapi.LocalSesApi` (the
dev stack's), answering in SES's real error format (HTTP status,
``x-amzn-ErrorType``, ``{"message"}``) whatever a test queues up, and counting
every request it receives, so "not retried" is proven by a count.
"""

from __future__ import annotations

import threading
from collections import deque

from emailrelay.dev.sesapi import LocalSesApi, SentRequest, SesReply

THROTTLED = SesReply(429, "TooManyRequestsException", "Maximum sending rate exceeded.")
DAILY_QUOTA = SesReply(400, "LimitExceededException", "Daily message quota exceeded.")
PAUSED = SesReply(400, "SendingPausedException", "Sending is paused for this account.")
SUSPENDED = SesReply(400, "AccountSuspendedException", "The account is suspended.")
REJECTED = SesReply(
    400, "MessageRejected", "Email address is not verified: noreply@lfx.linuxfoundation.org"
)
SERVER_ERROR = SesReply(500, "InternalFailure", "An internal error occurred.")
SILENCE = SesReply(silent=True)


class ScriptedSes(LocalSesApi):
    """Answers the queued replies in order, then ``otherwise`` (success by default)."""

    def __init__(self, latency: float = 0.0) -> None:
        super().__init__(answer=self._next_reply, latency=latency)
        self._queued: deque[SesReply] = deque()
        self._queue_lock = threading.Lock()
        self.otherwise: SesReply | None = None

    def reply_next(self, reply: SesReply, times: int = 1) -> None:
        with self._queue_lock:
            self._queued.extend([reply] * times)

    def _next_reply(self, request: SentRequest) -> SesReply | None:
        with self._queue_lock:
            if self._queued:
                return self._queued.popleft()
        return self.otherwise

    @property
    def request_count(self) -> int:
        return len(self.requests)
