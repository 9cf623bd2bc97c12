"""Tracking writes that outlive an outage.

A send waits for its tracking writes (the record, then the group-index entry)
while its request's time allows. What is not stored by then, because NATS or
JetStream is down for longer, is handed to :class:`PendingTrackingWrites`: a
bounded queue in this process that a background task writes once the store
answers again, oldest first, with jittered backoff meanwhile. Each write
remembers how far it got, and both steps are idempotent (a retried ``create``
that conflicts means an earlier attempt landed; an append skips an id already
in the index), so a write interrupted half-way is simply tried again.

Beside them wait the ``sent`` events of the ``EMAIL_EVENTS`` stream that
could not be published (:meth:`PendingTrackingWrites.add_publish`): the same
loop publishes them once the stream answers (their ``Nats-Msg-Id`` lets the
stream drop a copy, should an earlier attempt have landed after all).

The queue lives in memory: a process killed with SIGKILL loses it (those
emails were sent but stay unrecorded). A clean shutdown gives it a bounded
last try and logs the email ids it could not store.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from emailrelay.api import TrackingRecord
from emailrelay.metrics import (
    STREAM_EVENTS_PENDING,
    TRACKING_PENDING,
    TRACKING_PENDING_DROPPED,
)
from emailrelay.supervision import Backoff

log = logging.getLogger(__name__)

MAX_WRITES = 10_000
"""Pending writes one process keeps (at ~1 KB a record, ~10 MB)."""
MAX_BYTES = 64 * 1024 * 1024
"""Bound on the records' encoded size too: big subjects make big records."""

_IDS_PER_LOG_LINE = 100


class TrackingWriter(Protocol):
    async def create_record(self, record: TrackingRecord) -> None: ...
    async def append_to_group(self, group_id: str, email_id: str) -> None: ...


@dataclass(eq=False)
class _Write:
    record: TrackingRecord
    writer: TrackingWriter
    size: int
    record_stored: bool


@dataclass(eq=False)
class _Publish:
    """A stream event waiting to be published (``publish`` raises until it is)."""

    key: str
    publish: Callable[[], Awaitable[None]]
    size: int


class PendingTrackingWrites:
    """Tracking writes of sent emails, waiting for the store to come back."""

    def __init__(
        self,
        max_writes: int = MAX_WRITES,
        max_bytes: int = MAX_BYTES,
        backoff_initial: float = 0.25,
        backoff_max: float = 5.0,
        concurrency: int = 16,
    ) -> None:
        self._max_writes = max_writes
        self._max_bytes = max_bytes
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._concurrency = concurrency
        self._writes: dict[str, _Write] = {}  # by email id, oldest first
        self._publishes: dict[str, _Publish] = {}  # by event id, oldest first
        self._bytes = 0
        self._added = anyio.Event()
        self._last_error = ""

    def __len__(self) -> int:
        return len(self._writes) + len(self._publishes)

    @property
    def email_ids(self) -> list[str]:
        return list(self._writes)

    def add(
        self, record: TrackingRecord, writer: TrackingWriter, *, record_stored: bool = False
    ) -> bool:
        """Queue the rest of ``record``'s tracking writes (the group-index
        entry only, when ``record_stored``); ``False`` when the queue is full
        and the write is dropped (counted)."""
        if record.email_id in self._writes:
            return True
        size = len(record.to_json())
        if len(self._writes) >= self._max_writes or self._bytes + size > self._max_bytes:
            TRACKING_PENDING_DROPPED.inc()
            return False
        self._writes[record.email_id] = _Write(record, writer, size, record_stored)
        self._bytes += size
        TRACKING_PENDING.inc()
        self._added.set()
        return True

    def add_publish(self, key: str, publish: Callable[[], Awaitable[None]], size: int) -> bool:
        """Keep ``publish`` (a stream event of ``size`` bytes, ``key`` its
        event id) until it succeeds; ``False`` when the queue is full and it is
        dropped (counted)."""
        if key in self._publishes:
            return True
        if len(self) >= self._max_writes or self._bytes + size > self._max_bytes:
            TRACKING_PENDING_DROPPED.inc()
            return False
        self._publishes[key] = _Publish(key, publish, size)
        self._bytes += size
        STREAM_EVENTS_PENDING.inc()
        self._added.set()
        return True

    async def write_when_possible(self) -> None:
        """Run until cancelled: store what is pending whenever the store answers."""
        failed_passes = 0
        while True:
            if not self:
                self._added = anyio.Event()
                await self._added.wait()
                continue
            count = len(self)
            if await self._write_pass():
                if failed_passes:
                    log.info("pending tracking writes stored", extra={"count": count})
                failed_passes = 0
                continue
            failed_passes += 1
            if failed_passes == 1:
                log.warning(
                    "tracking writes pending until the KV store answers again",
                    extra={"count": count, "error": self._last_error},
                )
            await self._back_off(failed_passes)

    async def last_try(self, within: float) -> list[str]:
        """At shutdown: keep trying for at most ``within`` seconds, then log
        the email ids still not stored (ids only) and return them."""
        with anyio.move_on_after(within):
            failed_passes = 0
            while self and not await self._write_pass():
                failed_passes += 1
                await self._back_off(failed_passes)
        if self._publishes:
            log.error(
                "stream events lost at shutdown: these emails were sent, EMAIL_EVENTS never heard",
                extra={"count": len(self._publishes), "event_ids": list(self._publishes)[:100]},
            )
        left = self.email_ids
        for start in range(0, len(left), _IDS_PER_LOG_LINE):
            log.error(
                "tracking writes lost at shutdown: these emails were sent but are not recorded",
                extra={"count": len(left), "email_ids": left[start : start + _IDS_PER_LOG_LINE]},
            )
        return left

    async def _write_pass(self) -> bool:
        """One pass over what is pending now. The oldest goes first, alone: while
        the store is down one failed attempt per pass is enough. The rest then
        go concurrently, and stop starting at the first failure. ``False``
        when anything failed."""
        writes: list[_Write | _Publish] = [*self._writes.values(), *self._publishes.values()]
        if not await self._write(writes[0]):
            return False
        failed = False
        limiter = anyio.CapacityLimiter(self._concurrency)

        async def write(pending: _Write | _Publish) -> None:
            nonlocal failed
            async with limiter:
                if not failed and not await self._write(pending):
                    failed = True

        async with anyio.create_task_group() as tg:
            for pending in writes[1:]:
                tg.start_soon(write, pending)
        return not failed

    async def _write(self, pending: _Write | _Publish) -> bool:
        if isinstance(pending, _Publish):
            return await self._publish(pending)
        record = pending.record
        try:
            if not pending.record_stored:
                await pending.writer.create_record(record)
                pending.record_stored = True
            await pending.writer.append_to_group(record.group_id, record.email_id)
        except Exception as exc:
            # Any failure, not only StoreError: the email is out, and this
            # queue is its record's last chance.
            self._last_error = repr(exc)
            log.debug(
                "pending tracking write failed",
                extra={"email_id": record.email_id, "error": repr(exc)},
            )
            return False
        self._remove(pending)
        return True

    async def _publish(self, pending: _Publish) -> bool:
        try:
            await pending.publish()
        except Exception as exc:
            self._last_error = repr(exc)
            log.debug("pending stream event failed", extra={"event_id": pending.key})
            return False
        if self._publishes.pop(pending.key, None) is pending:
            self._bytes -= pending.size
            STREAM_EVENTS_PENDING.dec()
        return True

    def _remove(self, pending: _Write) -> None:
        if self._writes.pop(pending.record.email_id, None) is pending:
            self._bytes -= pending.size
            TRACKING_PENDING.dec()

    async def _back_off(self, failed_passes: int) -> None:
        await Backoff(self._backoff_initial, self._backoff_max).sleep(failed_passes + 1)
