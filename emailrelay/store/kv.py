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

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import anyio

T = TypeVar("T")


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


def one_store_error(group: BaseExceptionGroup[BaseException]) -> StoreError:
    """The one :class:`StoreError` that stands for the failures of
    concurrent reads or writes (a :class:`BucketMissing` first: re-opening
    the bucket is what cures the others).

    A cancellation among them is raised alone instead, so that the cancel
    scope it belongs to catches it: left inside the group, the scope would
    take its ``Cancelled`` out and let the rest escape as an
    ``ExceptionGroup``, past every ``except StoreError`` of the caller.
    Anything else (a bug) raises the whole group."""
    cancelled, rest = group.split(anyio.get_cancelled_exc_class())
    store_errors, other = (None, None) if rest is None else rest.split(StoreError)
    if other is not None:
        raise group
    if cancelled is not None:
        raise next(_leaves(cancelled))
    assert store_errors is not None
    errors = [exc for exc in _leaves(store_errors) if isinstance(exc, StoreError)]
    missing = [exc for exc in errors if isinstance(exc, BucketMissing)]
    return (missing or errors)[0]


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


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

    async def purge(self, key: str, last: int | None = None) -> None:
        """Remove the key and every revision of it (a purge marker without a
        value is all that stays); with ``last``, only if the key is still at
        that revision, else :class:`RevisionConflict`. Purging a missing key
        without ``last`` is not an error."""
        ...


class ListableKeyValue(KeyValue, Protocol):
    async def keys(self) -> list[str]:
        """Every key that holds a value, in no particular order. Reads the
        whole bucket: for management listings, not for the send path."""
        ...


@dataclass(frozen=True)
class Change:
    """A key's latest write: its entry, or ``None`` when it was deleted or purged."""

    key: str
    entry: Entry | None


@dataclass(frozen=True)
class Changes:
    """What :meth:`FollowableKeyValue.changes` found: ``changes`` in
    revision order (a key may appear more than once: its later write wins),
    up to ``revision``.

    ``epoch`` names the bucket's incarnation: it differs once the bucket was
    deleted and created again (revisions then start over), and a follower
    starts again from revision 0. ``more``: there are writes after
    ``revision``, ask again. ``complete``: ``changes`` is every key there is
    (an adapter that cannot follow writes lists everything), so a follower
    replaces what it knew."""

    epoch: str
    revision: int
    changes: list[Change]
    more: bool = False
    complete: bool = False


@runtime_checkable
class FollowableKeyValue(ListableKeyValue, Protocol):
    async def changes(self, after: int) -> Changes:
        """The writes after revision ``after`` (the first ones, when there
        are many: see ``more``), each key's latest. Reads only those writes
        (plus one small request), so a follower that keeps up pays for what
        changed, not for the bucket."""
        ...


Derive = Callable[[Entry | None], tuple[bytes | None, T]]
"""What to write given a key's current entry (``None``: no such key): the new
value (``None``: write nothing) and a result for the caller. Pure: an adapter
may run it inside its own event loop, between the read and the write."""


async def read_then_write(kv: KeyValue, key: str, derive: Derive[T]) -> tuple[T, int | None]:
    """Read ``key``, then write what ``derive`` makes of it: ``create`` when the
    key is missing, else ``update`` at the revision read. Returns ``derive``'s
    result and the new revision (``None`` when nothing was written); a lost race
    is :class:`RevisionConflict`, as for the single calls.

    An adapter with a ``read_then_write`` method of its own does both in one
    call (the JetStream adapter: one crossing into the asyncio loop, not two)."""
    own = getattr(kv, "read_then_write", None)
    if own is not None:
        result: tuple[T, int | None] = await own(key, derive)
        return result
    return await read_then_write_separately(kv, key, derive)


DerivePair = Callable[[Entry | None, Entry | None], tuple[bytes | None, T]]
""":data:`Derive` that also sees a second key's entry (read, never written)."""


async def read_pair_then_write(
    kv: KeyValue, key: str, other: str, derive: DerivePair[T]
) -> tuple[T, int | None]:
    """:func:`read_then_write` of ``key`` that lets ``derive`` see ``other``
    too, read at the same time (the JetStream adapter: both gets concurrently,
    one crossing into the asyncio loop)."""
    own = getattr(kv, "read_pair_then_write", None)
    if own is not None:
        result: tuple[T, int | None] = await own(key, other, derive)
        return result
    seen = await kv.get(other)
    return await read_then_write_separately(kv, key, lambda entry: derive(entry, seen))


async def read_then_write_separately(
    kv: KeyValue, key: str, derive: Derive[T]
) -> tuple[T, int | None]:
    """:func:`read_then_write` as a ``get`` and a ``create``/``update``."""
    entry = await kv.get(key)
    value, result = derive(entry)
    if value is None:
        return result, None
    if entry is None:
        return result, await kv.create(key, value)
    return result, await kv.update(key, value, last=entry.revision)


MAX_BATCH_KEYS = 1000
"""JetStream answers a batch get of at most 1,000 subjects (413 beyond)."""


async def changes_of(kv: ListableKeyValue, after: int) -> Changes:
    """``kv.changes(after)`` where the adapter can follow its writes; else
    every key there is (``complete``), read in batches."""
    if isinstance(kv, FollowableKeyValue):
        return await kv.changes(after)
    return await every_entry(kv)


async def every_entry(kv: ListableKeyValue) -> Changes:
    """The whole bucket as :class:`Changes` (``complete``): every key listed,
    then read in batches of :data:`MAX_BATCH_KEYS`."""
    keys = await kv.keys()
    found: list[Change] = []
    for start in range(0, len(keys), MAX_BATCH_KEYS):
        entries = await kv.get_many(keys[start : start + MAX_BATCH_KEYS])
        found += [Change(key, entry) for key, entry in entries.items()]
    return Changes("", 0, found, complete=True)
