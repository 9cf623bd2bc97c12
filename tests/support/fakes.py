"""In-memory stand-ins for fast unit tests of pure logic.

``MemoryKeyValue`` implements :class:`emailrelay.store.kv.KeyValue` with the
same revision rules as JetStream KV (one sequence for the whole bucket,
``create`` fails on an existing key, ``update`` fails unless ``last`` is the
key's current revision). Tests can make it fail like a real store: ``closed``
makes every call raise StoreError (and clearing it recovers); ``hanging``
makes every call wait for ever, as JetStream's do while a stream has no
leader; ``late_failure`` makes every call take that many seconds, not
cancellable (a round trip already on the wire), and then raise StoreError;
``conflicts_before_success`` makes the next N writes lose a race first (as if
another replica had written in between); ``missing`` makes every call raise
BucketMissing, as a deleted bucket does.

``MemoryBuckets`` is the place buckets are opened and created
(:class:`emailrelay.store.buckets.BucketHost`): ``delete`` removes a bucket
under whoever holds it, ``jetstream_down`` makes opening fail.
"""

from __future__ import annotations

import email
import email.policy
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from emailrelay.api import TrackingRecord
from emailrelay.deadline import Deadline
from emailrelay.sqs import SqsMessage
from emailrelay.store.kv import (
    MAX_BATCH_KEYS,
    BucketMissing,
    Change,
    Changes,
    Entry,
    RevisionConflict,
    StoreError,
)


class MemoryKeyValue:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.closed = False
        self.missing = False
        self.conflicts_before_success = 0
        self.failing_keys: set[str] = set()
        self.hanging = False
        self.late_failure = 0.0
        self.gets = 0
        self.batch_gets = 0
        self.writes = 0
        self.values_read = 0
        """Entries handed out by ``get_many`` and ``changes``: what a read cost."""
        self.epoch = uuid.uuid4().hex
        self.failures = 0
        """Calls that raised (closed, missing, a failing key): what a test waits on
        to know the code under test met the failure."""
        self._sequence = 0

    async def _arrive(self, key: str) -> None:
        """Where every call meets the store: a checkpoint, then its failures."""
        await anyio.lowlevel.checkpoint()
        if self.hanging:
            await anyio.sleep_forever()
        if self.late_failure:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(self.late_failure)
            self.failures += 1
            raise StoreError("store failed late")
        self._check(key)

    def _check(self, key: str) -> None:
        if self.missing or self.closed or key in self.failing_keys:
            self.failures += 1
        if self.missing:
            raise BucketMissing("bucket deleted")
        if self.closed:
            raise StoreError("store closed")
        if key in self.failing_keys:
            raise StoreError(f"{key}: read failed")

    async def get(self, key: str) -> Entry | None:
        await self._arrive(key)
        self.gets += 1
        return self.entries.get(key)

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, Entry]:
        await anyio.lowlevel.checkpoint()
        if len(keys) > MAX_BATCH_KEYS:
            raise StoreError("too many keys in one batch")
        for key in keys:
            self._check(key)
        self.batch_gets += 1
        found = {key: self.entries[key] for key in keys if key in self.entries}
        self.values_read += len(found)
        return found

    async def changes(self, after: int) -> Changes:
        """The writes after ``after``, each key's latest, at most
        ``MAX_BATCH_KEYS`` a call (as the JetStream adapter reads its stream)."""
        await anyio.lowlevel.checkpoint()
        self._check("")
        later = sorted(
            ((key, entry) for key, entry in self.entries.items() if entry.revision > after),
            key=lambda item: item[1].revision,
        )
        batch = later[:MAX_BATCH_KEYS]
        self.values_read += len(batch)
        revision = batch[-1][1].revision if batch else max(after, self._sequence)
        return Changes(
            self.epoch,
            revision,
            [Change(key, entry) for key, entry in batch],
            more=len(later) > len(batch),
        )

    async def keys(self) -> list[str]:
        await anyio.lowlevel.checkpoint()
        if self.missing:
            raise BucketMissing("bucket deleted")
        if self.closed:
            raise StoreError("store closed")
        return list(self.entries)

    async def create(self, key: str, value: bytes) -> int:
        await self._arrive(key)
        if key in self.entries or self._lose_race():
            raise RevisionConflict(key)
        return self._store(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        await self._arrive(key)
        current = self.entries.get(key)
        if current is None or current.revision != last or self._lose_race():
            raise RevisionConflict(key)
        return self._store(key, value)

    async def purge(self, key: str, last: int | None = None) -> None:
        await self._arrive(key)
        current = self.entries.get(key)
        if last is not None and (current is None or current.revision != last):
            raise RevisionConflict(key)
        self.writes += 1
        self.entries.pop(key, None)

    def put(self, key: str, value: bytes) -> int:
        """Write without any check (test set-up)."""
        return self._store(key, value)

    def _lose_race(self) -> bool:
        if self.conflicts_before_success > 0:
            self.conflicts_before_success -= 1
            return True
        return False

    def _store(self, key: str, value: bytes) -> int:
        self._sequence += 1
        self.writes += 1
        self.entries[key] = Entry(value=value, revision=self._sequence)
        return self._sequence


@dataclass(frozen=True)
class CreatedBucket:
    name: str
    max_value_size: int
    replicas: int
    max_age: float = 0.0


class MemoryBuckets:
    def __init__(self, *names: str) -> None:
        self.buckets: dict[str, MemoryKeyValue] = {name: MemoryKeyValue() for name in names}
        self.created: list[CreatedBucket] = []
        self.jetstream_down = False
        self.opens = 0

    async def key_value(self, bucket: str) -> MemoryKeyValue | None:
        await anyio.lowlevel.checkpoint()
        if self.jetstream_down:
            raise StoreError("JetStream unavailable")
        self.opens += 1
        return self.buckets.get(bucket)

    async def create_key_value(
        self, bucket: str, max_value_size: int, replicas: int, max_age: float = 0.0
    ) -> MemoryKeyValue:
        await anyio.lowlevel.checkpoint()
        if self.jetstream_down:
            raise StoreError("JetStream unavailable")
        if bucket not in self.buckets:
            self.buckets[bucket] = MemoryKeyValue()
            self.created.append(CreatedBucket(bucket, max_value_size, replicas, max_age))
        return self.buckets[bucket]

    def delete(self, bucket: str) -> MemoryKeyValue:
        """Delete the bucket: its data is gone and every handle on it fails."""
        kv = self.buckets.pop(bucket)
        kv.missing = True
        return kv

    def declare(self, bucket: str) -> MemoryKeyValue:
        """Create the bucket from outside (an operator, a GitOps tool)."""
        kv = self.buckets[bucket] = MemoryKeyValue()
        return kv


# --- the send path and the engagement poller -------------------------------------


@dataclass
class Sent:
    sender: str
    recipient: str
    message: bytes

    @property
    def parsed(self) -> Any:
        return email.message_from_bytes(self.message, policy=email.policy.default)


@dataclass
class FakeSender:
    sent: list[Sent] = field(default_factory=list)
    failure: Exception | None = None
    delay: float = 0.0

    async def send(self, sender: str, recipient: str, message: bytes, deadline: Deadline) -> None:
        if self.delay:
            await anyio.sleep(self.delay)
        if self.failure is not None:
            raise self.failure
        self.sent.append(Sent(sender, recipient, message))


class FakeStore:
    def __init__(self, record: TrackingRecord | None, error: Exception | None = None) -> None:
        self.record = record
        self.error = error

    async def update_record(
        self, email_id: str, change: Callable[[TrackingRecord], bool]
    ) -> TrackingRecord | None:
        if self.error is not None:
            raise self.error
        if self.record is None or self.record.email_id != email_id:
            return None
        change(self.record)
        return self.record


def message(body: str, message_id: str = "m1", receive_count: int = 1) -> SqsMessage:
    return SqsMessage(
        message_id=message_id,
        receipt_handle=f"h-{message_id}",
        body=body,
        receive_count=receive_count,
    )
