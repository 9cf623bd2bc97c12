"""The dev stack's engagement queue: SQS's semantics, in memory.

The dev stack runs the production poller (:func:`emailrelay.engagement.
poll_engagement_events`) over this queue instead of SQS, so an event from a
laptop is received, applied, retried and deleted exactly as one from SES is:

* a message becomes visible after its delay, and a received message is
  invisible for ``visibility_timeout`` seconds, then comes back with its
  receive count raised, unless it was deleted (an event for a record that
  is not written yet is retried, as in production);
* ``receive_messages`` long-polls: it waits until a message is visible or
  ``wait_seconds`` pass.

Callers in the stack can wait until a message is deleted (handled).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio

from emailrelay.sqs import SqsMessage


@dataclass(eq=False)
class _Queued:
    message_id: str
    body: str
    sent_at: datetime
    visible_at: float
    receive_count: int = 0
    receipt_handle: str = ""
    deleted: anyio.Event = field(default_factory=anyio.Event)


class DevEventQueue:
    """An in-memory queue for one process's event loop (not thread-safe)."""

    def __init__(self, visibility_timeout: float = 1.0) -> None:
        self.visibility_timeout = visibility_timeout
        self._messages: dict[str, _Queued] = {}
        self._changed = anyio.Event()

    def send(self, body: str, delay: float = 0.0) -> str:
        """Queue ``body``, visible after ``delay`` seconds; its message id."""
        message = _Queued(
            message_id=str(uuid.uuid4()),
            body=body,
            sent_at=datetime.now(UTC),
            visible_at=anyio.current_time() + delay,
        )
        self._messages[message.message_id] = message
        self._wake_receivers()
        return message.message_id

    async def wait_deleted(self, message_id: str) -> None:
        """Until ``message_id`` is deleted (handled)."""
        message = self._messages.get(message_id)
        if message is not None:
            await message.deleted.wait()

    async def receive_messages(
        self, max_messages: int = 10, wait_seconds: int = 20
    ) -> list[SqsMessage]:
        deadline = anyio.current_time() + wait_seconds
        while True:
            now = anyio.current_time()
            visible = [m for m in self._messages.values() if m.visible_at <= now]
            if visible:
                return [self._receive(m, now) for m in visible[:max_messages]]
            if now >= deadline:
                return []
            next_visible = min((m.visible_at for m in self._messages.values()), default=math.inf)
            changed = self._changed
            with anyio.move_on_after(min(deadline, next_visible) - now):
                await changed.wait()

    async def delete_messages(self, messages: Iterable[SqsMessage]) -> list[str]:
        """Delete by receipt handle; the ids whose handle is stale (SQS would fail them)."""
        failed = []
        for received in messages:
            message = self._messages.get(received.message_id)
            if message is None or message.receipt_handle != received.receipt_handle:
                failed.append(received.message_id)
                continue
            del self._messages[received.message_id]
            message.deleted.set()
        return failed

    def _receive(self, message: _Queued, now: float) -> SqsMessage:
        message.receive_count += 1
        message.visible_at = now + self.visibility_timeout
        message.receipt_handle = str(uuid.uuid4())
        return SqsMessage(
            message_id=message.message_id,
            receipt_handle=message.receipt_handle,
            body=message.body,
            receive_count=message.receive_count,
            sent_at=message.sent_at,
        )

    def _wake_receivers(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
