"""In-memory stand-ins for fast unit tests of pure logic.

``MemoryKeyValue`` implements :class:`emailrelay.store.kv.KeyValue` with the
same revision rules as JetStream KV (one sequence for the whole bucket,
``create`` fails on an existing key, ``update`` fails unless ``last`` is the
key's current revision). Tests can make it fail like a real store: ``closed``
makes every call raise StoreError; ``conflicts_before_success`` makes the next
N writes lose a race first (as if another replica had written in between).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anyio

from emailrelay.store.kv import MAX_BATCH_KEYS, Entry, RevisionConflict, StoreError


class MemoryKeyValue:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.closed = False
        self.conflicts_before_success = 0
        self.failing_keys: set[str] = set()
        self.gets = 0
        self.batch_gets = 0
        self.writes = 0
        self._sequence = 0

    def _check(self, key: str) -> None:
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
