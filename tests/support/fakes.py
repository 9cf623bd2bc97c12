"""In-memory stand-ins for fast unit tests of pure logic.

``MemoryKeyValue`` implements :class:`emailrelay.store.kv.KeyValue` with the
same revision rules as JetStream KV (one sequence for the whole bucket,
``create`` fails on an existing key, ``update`` fails unless ``last`` is the
key's current revision). Tests can make it fail like a real store: ``closed``
makes every call raise StoreError (and clearing it recovers);
``conflicts_before_success`` makes the next N writes lose a race first (as if
another replica had written in between); ``missing`` makes every call raise
BucketMissing, as a deleted bucket does.

``MemoryBuckets`` is the place buckets are opened and created
(:class:`emailrelay.store.buckets.BucketHost`): ``delete`` removes a bucket
under whoever holds it, ``jetstream_down`` makes opening fail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio

from emailrelay.store.kv import (
    MAX_BATCH_KEYS,
    BucketMissing,
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
        self.gets = 0
        self.batch_gets = 0
        self.writes = 0
        self._sequence = 0

    def _check(self, key: str) -> None:
        if self.missing:
            raise BucketMissing("bucket deleted")
        if self.closed:
            raise StoreError("store closed")
        if key in self.failing_keys:
            raise StoreError(f"{key}: read failed")

    async def get(self, key: str) -> Entry | None:
        await anyio.lowlevel.checkpoint()
        self._check(key)
        self.gets += 1
        return self.entries.get(key)

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, Entry]:
        await anyio.lowlevel.checkpoint()
        if len(keys) > MAX_BATCH_KEYS:
            raise StoreError("too many keys in one batch")
        for key in keys:
            self._check(key)
        self.batch_gets += 1
        return {key: self.entries[key] for key in keys if key in self.entries}

    async def keys(self) -> list[str]:
        await anyio.lowlevel.checkpoint()
        if self.missing:
            raise BucketMissing("bucket deleted")
        if self.closed:
            raise StoreError("store closed")
        return list(self.entries)

    async def create(self, key: str, value: bytes) -> int:
        await anyio.lowlevel.checkpoint()
        self._check(key)
        if key in self.entries or self._lose_race():
            raise RevisionConflict(key)
        return self._store(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        await anyio.lowlevel.checkpoint()
        self._check(key)
        current = self.entries.get(key)
        if current is None or current.revision != last or self._lose_race():
            raise RevisionConflict(key)
        return self._store(key, value)

    async def purge(self, key: str, last: int | None = None) -> None:
        await anyio.lowlevel.checkpoint()
        self._check(key)
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
