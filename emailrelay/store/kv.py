"""The small key-value interface the tracking store is written against.

The JetStream adapter (:mod:`emailrelay.bridge.nats`) implements it over
nats-py; tests implement it in memory (``tests/support/fakes.py``). Three outcomes are
kept apart on purpose: a missing key (``None``), a lost race
(:class:`RevisionConflict`, retry) and a failing store (:class:`StoreError`,
never read as "missing"). One failure is told apart from the others: the
bucket itself is gone (:class:`BucketMissing`), which re-opening or
re-creating it cures (:mod:`emailrelay.store.buckets`) and waiting does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Entry:
    value: bytes
    revision: int


class RevisionConflict(Exception):
    """The key was created or changed since it was read: read again and retry."""


class StoreError(Exception):
    """The store could not answer (connection lost, timeout, JetStream error)."""


class BucketMissing(StoreError):
    """The bucket does not exist (deleted while the relay runs). Raised only
    when JetStream itself said so: a timeout or an unreachable JetStream is a
    plain :class:`StoreError`, whatever it may look like."""


class KeyValue(Protocol):
    async def get(self, key: str) -> Entry | None:
        """The latest value, or ``None`` when the key does not exist (or was deleted)."""
        ...

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, Entry]:
        """The latest value of each key that exists; missing (or deleted) keys
        are absent from the result. At most :data:`MAX_BATCH_KEYS` keys; one
        :class:`StoreError` when the batch cannot be read."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Store a new key; :class:`RevisionConflict` if it exists already."""
        ...

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Replace the value if the key is still at revision ``last``,
        else :class:`RevisionConflict`."""
        ...


class ListableKeyValue(KeyValue, Protocol):
    async def keys(self) -> list[str]:
        """Every key that holds a value, in no particular order. Reads the
        whole bucket: for management listings, not for the send path."""
        ...


MAX_BATCH_KEYS = 1000
"""JetStream answers a batch get of at most 1,000 subjects (413 beyond)."""
