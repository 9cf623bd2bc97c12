"""A paged index: an ordered list of ids under one name, kept in JSON arrays
of bounded size. The group index (``email-group-index``) and the recipient
index (``email-recipient-index``) share it (docs/contract.md, "JetStream KV").

The layout of the index named ``N`` (keys from :mod:`emailrelay.store.keys`):

- the head, under ``group_key(N)``: a JSON array of the first
  :data:`HEAD_CAPACITY` ids, exactly as the replaced relay wrote it. An index
  that never grew past it has no other key, and a head that is not full is
  always the tail: appends go there.
- once the head is full, the ids that follow go to overflow pages
  ``index_page_key(N, n)`` (n = 1, 2, …; :data:`PAGE_CAPACITY` ids each),
  and the range key ``index_range_key(N)`` holds ``{"first": f, "last": l}``:
  the pages that may hold ids. Appends go to page ``l``; when it is full the
  range moves on first and the new page is written after (a crash between
  leaves a missing page, which readers skip and the next append creates).
- pages may hold fewer ids than their capacity, or be gone: an erasure
  removes ids (and purges the pages it empties), and with ``RETENTION`` the
  oldest pages expire. So readers read the head (when it is still there)
  and every page from ``f`` to ``l`` that is there, in that order, and show
  each id once: a retried append whose first attempt landed unseen can leave
  an id on two pages. An index with neither a head nor a range key does not
  exist.
- an erasure that changes the head of an index with a range moves the
  remaining ids of the head to page 0 (and the range's ``first`` to 0), then
  purges the head: a head that is there is either full or the tail.
- with ``RETENTION`` (``touch_range``), every append and erasure rewrites the
  range key before its page, so the range outlives every page it names: a
  group whose head expired while it kept growing still lists what remains,
  in order, and the next append lands after it. ``first`` moves past expired
  pages whenever a new page is started.
- indexes written before the range key existed (a head of at least
  :data:`HEAD_CAPACITY` ids and pages from 1 without a range key) are read by
  walking the pages from 1 until one is missing; the first append or erasure
  writes their range.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from functools import partial
from itertools import count, islice
from typing import Literal

import anyio

from emailrelay.metrics import KV_CONFLICTS
from emailrelay.store.keys import group_key, index_page_key, index_range_key
from emailrelay.store.kv import (
    Entry,
    KeyValue,
    RevisionConflict,
    StoreError,
    read_pair_then_write,
    read_then_write,
)

log = logging.getLogger(__name__)

HEAD_CAPACITY = 1000
"""Ids kept in the plain array under the group key (older data may hold more)."""
PAGE_CAPACITY = 1000
"""Ids per overflow page: ~40 KB of uuids, far below the 1 MiB value limit."""

_PAGE_WINDOW = 16  # pages fetched per batch while reading an index
_OVERFLOW_HINTS = 4096  # indexes this process knows to have a range key


class CorruptValue(StoreError):
    """A stored value that does not decode as what the key should hold."""


@dataclass(frozen=True)
class _Step:
    """What one page did for an append: the ids still to add, and what happened."""

    pending: list[str]
    move: Literal["wrote", "done", "full", "missing"]


class PagedIndex:
    """The ids of many named indexes in one bucket (see the module docstring).

    Every write is revision-checked and retried on conflict with full-jitter
    backoff; concurrent appends to one name in this process are coalesced
    into one write per batch."""

    def __init__(
        self,
        kv: KeyValue,
        bucket: str,
        *,
        touch_range: bool = False,
        backoff_initial: float = 0.002,
        backoff_max: float = 0.1,
    ) -> None:
        self._kv = kv
        self._bucket = bucket
        self._touch_range = touch_range
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._in_flight: dict[str, _Writes] = {}
        self._overflowed: OrderedDict[str, None] = OrderedDict()

    # --- reading -------------------------------------------------------------

    async def ids(self, name: str) -> list[str] | None:
        """Every id, in index order, each once; ``None`` when there is no such
        index. :class:`StoreError` (or :class:`CorruptValue`) when it cannot
        be read: never a partial list."""
        seen: dict[str, None] = {}

        def visit(page: list[str]) -> bool:
            seen.update(dict.fromkeys(page))
            return True

        return list(seen) if await self._walk(name, visit) else None

    async def ids_slice(self, name: str, offset: int, limit: int) -> list[str] | None:
        """Ids ``offset`` to ``offset + limit`` (exclusive) of :meth:`ids`;
        ``None`` when there is no such index. Pages may hold fewer ids than
        their capacity, so this reads the pages up to the slice's end."""
        if offset < 0 or limit < 1:
            raise ValueError("offset must be >= 0 and limit >= 1")
        seen: set[str] = set()
        selected: list[str] = []
        end = offset + limit

        def visit(page: list[str]) -> bool:
            for email_id in page:
                if email_id in seen:
                    continue
                if len(seen) >= offset:
                    selected.append(email_id)
                seen.add(email_id)
                if len(seen) >= end:
                    return False
            return True

        return selected if await self._walk(name, visit) else None

    async def _walk(self, name: str, visit: Callable[[list[str]], bool]) -> bool:
        """Hand every page's ids to ``visit`` in index order until it answers
        ``False``; ``False`` when the index does not exist."""
        head = await self._kv.get(group_key(name))
        head_ids = [] if head is None else _decode_ids(head.value)
        if head is not None and len(head_ids) < HEAD_CAPACITY:
            visit(head_ids)  # a head that is not full is the whole index: one read
            return True
        span = await self._kv.get(index_range_key(name))
        if head is None and span is None:
            return False
        if head is not None and not visit(head_ids):
            return True
        numbers: Iterable[int]
        if span is not None:
            first, last = _decode_range(span.value)
            numbers, until_missing = range(first, last + 1), False
        elif len(head_ids) < HEAD_CAPACITY:
            return True
        else:
            numbers, until_missing = count(1), True  # written before range keys
        iterator = iter(numbers)
        while window := list(islice(iterator, _PAGE_WINDOW)):
            keys = [index_page_key(name, n) for n in window]
            pages = await self._kv.get_many(keys)
            for key in keys:
                entry = pages.get(key)
                if entry is None:
                    if until_missing:
                        return True
                    continue
                if not visit(_decode_ids(entry.value)):
                    return True
        return True

    # --- appending -----------------------------------------------------------

    async def append(self, name: str, email_id: str) -> None:
        """Add ``email_id`` to the index, exactly once.

        Concurrent appends to one name in this process are coalesced: while
        one write is under way the others gather into the next batch, which
        goes out as a single revision-checked update. A hot group then costs
        one KV round trip per batch instead of a storm of conflicts.
        """
        state = self._in_flight.get(name)
        if state is None:
            state = self._in_flight[name] = _Writes()
        if state.next_batch is None:
            state.next_batch = _Batch()
        batch = state.next_batch
        batch.ids.append(email_id)
        state.users += 1
        try:
            async with state.lock:
                if state.next_batch is batch:
                    state.next_batch = None
                    await self._write_batch(name, batch)
        finally:
            state.users -= 1
            if state.users == 0:
                del self._in_flight[name]
        if batch.error is not None:
            # A copy for each appender: one exception object raised by many
            # tasks would collect every one's traceback.
            raise copy.copy(batch.error) from batch.error

    async def _write_batch(self, name: str, batch: _Batch) -> None:
        try:
            await self._append_ids(name, batch.ids)
        except StoreError as exc:
            batch.error = exc
        except BaseException:
            # The writer was cancelled; the others in its batch must retry.
            batch.error = StoreError("index write interrupted")
            raise

    async def _append_ids(self, name: str, new_ids: list[str]) -> None:
        """Append to the head while it is the tail, else to the range's last
        page. An id found on the page written is not added again (an earlier
        attempt whose reply was lost)."""
        pending = list(dict.fromkeys(new_ids))
        overflowed = name in self._overflowed
        attempt = 0
        while pending:
            try:
                if overflowed:
                    pending, overflowed = await self._append_to_tail(name, pending)
                else:
                    pending, overflowed = await self._append_to_head(name, pending)
            except RevisionConflict:
                KV_CONFLICTS.labels(self._bucket).inc()
                attempt += 1
                await self._backoff(attempt)
        self._remember(name, overflowed)

    async def _append_to_head(self, name: str, pending: list[str]) -> tuple[list[str], bool]:
        """The head and the range key are read together (one round trip): a
        missing head is created only when there is no range either, since an
        index whose head expired or was erased while its pages live on takes
        new ids after them, never in a new head."""
        derive = partial(_head_step, pending=pending)
        step, _ = await read_pair_then_write(
            self._kv, group_key(name), index_range_key(name), derive
        )
        if step.move == "missing":
            return pending, True
        return step.pending, step.move == "full" or bool(step.pending)

    async def _append_to_tail(self, name: str, pending: list[str]) -> tuple[list[str], bool]:
        range_key = index_range_key(name)
        span = await self._read_range(range_key)
        if span is None:
            return pending, await self._start_range(name)
        first, last = _decode_range(span.value)
        derive = partial(_append_step, pending=pending, capacity=PAGE_CAPACITY)
        step, _ = await read_then_write(self._kv, index_page_key(name, last), derive)
        if step.move == "missing":  # the range names it: create it
            chunk = pending[:PAGE_CAPACITY]
            await self._kv.create(index_page_key(name, last), _encode_ids(chunk))
            return pending[len(chunk) :], True
        if step.move == "full":
            first = await self._first_live_page(name, first, last)
            await self._kv.update(range_key, _encode_range(first, last + 1), last=span.revision)
        return step.pending, True

    async def _read_range(self, range_key: str) -> Entry | None:
        """The range entry; rewritten unchanged first when ``touch_range``, so
        that its age restarts with every write to the index."""
        if not self._touch_range:
            return await self._kv.get(range_key)
        entry, revision = await read_then_write(self._kv, range_key, _touch)
        if entry is None or revision is None:
            return entry
        return Entry(entry.value, revision)

    async def _start_range(self, name: str) -> bool:
        """The range of an index whose head is full but has no range key
        yet (it just filled, or was written before range keys existed);
        ``False`` when the head is gone or not full after all (it is the tail)."""
        head = await self._kv.get(group_key(name))
        if head is None or len(_decode_ids(head.value)) < HEAD_CAPACITY:
            return False
        last = await self._last_page_without_range(name)
        await self._kv.create(index_range_key(name), _encode_range(1, max(last, 1)))
        return True

    async def _last_page_without_range(self, name: str) -> int:
        """The last of the pages 1, 2, … an index without a range key has."""
        last = 0
        while True:
            keys = [index_page_key(name, last + 1 + i) for i in range(_PAGE_WINDOW)]
            pages = await self._kv.get_many(keys)
            for key in keys:
                if key not in pages:
                    return last
                last += 1

    async def _first_live_page(self, name: str, first: int, last: int) -> int:
        """The lowest page from ``first`` that is still there (pages expire
        oldest first); ``last`` when none before it is."""
        for number in range(first, last):
            if await self._kv.get(index_page_key(name, number)) is not None:
                return number
        return last

    def _remember(self, name: str, overflowed: bool) -> None:
        if not overflowed:
            self._overflowed.pop(name, None)
            return
        self._overflowed[name] = None
        self._overflowed.move_to_end(name)
        while len(self._overflowed) > _OVERFLOW_HINTS:
            self._overflowed.popitem(last=False)

    # --- removing ------------------------------------------------------------

    async def remove(self, name: str, ids: Collection[str]) -> int:
        """Remove every occurrence of ``ids`` from the index; the number of
        entries removed. Other ids stay as they were, in order; a page left
        empty is purged; pages that hold none of ``ids`` are not rewritten."""
        targets = set(ids)
        if not targets:
            return 0
        head_key, range_key = group_key(name), index_range_key(name)
        found = await self._kv.get_many([head_key, range_key])
        head, span = found.get(head_key), found.get(range_key)
        if span is None and head is not None and len(_decode_ids(head.value)) >= HEAD_CAPACITY:
            await self._ensure_range(name)
            span = await self._kv.get(range_key)
        removed = 0
        if span is not None:
            first, last = _decode_range(span.value)
            for start in range(first, last + 1, _PAGE_WINDOW):
                keys = [
                    index_page_key(name, n)
                    for n in range(start, min(start + _PAGE_WINDOW, last + 1))
                ]
                pages = await self._kv.get_many(keys)
                for key in keys:
                    entry = pages.get(key)
                    if entry is not None and targets & set(_decode_ids(entry.value)):
                        removed += await self._remove_from_page(key, targets)
        if head is not None:
            removed += await self._remove_from_head(name, targets)
        if span is not None and self._touch_range and removed:
            await self._read_range(range_key)
        self._overflowed.pop(name, None)
        return removed

    async def purge_if_empty(self, name: str) -> None:
        """Purge the range key of an index that holds no id any more."""
        if await self.ids(name):
            return
        await self._kv.purge(index_range_key(name))

    async def _ensure_range(self, name: str) -> None:
        with contextlib.suppress(RevisionConflict):  # another writer wrote it
            await self._start_range(name)

    async def _remove_from_page(self, key: str, targets: set[str]) -> int:
        async def store(entry: Entry, kept: list[str]) -> None:
            if kept:
                await self._kv.update(key, _encode_ids(kept), last=entry.revision)
            else:
                await self._kv.purge(key, last=entry.revision)

        return await self._remove_from(key, targets, store)

    async def _remove_from_head(self, name: str, targets: set[str]) -> int:
        """The head is rewritten in place while it is the whole index; once
        the index has a range its remaining ids move to page 0 first."""
        head_key, range_key = group_key(name), index_range_key(name)

        async def store(entry: Entry, kept: list[str]) -> None:
            span = await self._kv.get(range_key)
            if span is None:
                if kept:
                    await self._kv.update(head_key, _encode_ids(kept), last=entry.revision)
                else:
                    await self._kv.purge(head_key, last=entry.revision)
                return
            if kept:
                await self._put(index_page_key(name, 0), _encode_ids(kept))
                first, last = _decode_range(span.value)
                if first > 0:
                    await self._kv.update(range_key, _encode_range(0, last), last=span.revision)
            await self._kv.purge(head_key, last=entry.revision)

        return await self._remove_from(head_key, targets, store)

    async def _remove_from(
        self,
        key: str,
        targets: set[str],
        store: Callable[[Entry, list[str]], Awaitable[None]],
    ) -> int:
        """Read ``key``'s ids and have ``store`` write what is left of them
        (revision-checked, retried on conflict); the number removed."""
        attempt = 0
        while True:
            entry = await self._kv.get(key)
            if entry is None:
                return 0
            ids = _decode_ids(entry.value)
            kept = [i for i in ids if i not in targets]
            if len(kept) == len(ids):
                return 0
            try:
                await store(entry, kept)
            except RevisionConflict:
                attempt += 1
                await self._backoff(attempt)
                continue
            return len(ids) - len(kept)

    async def _put(self, key: str, value: bytes) -> None:
        """Write ``value`` whatever the key holds (revision-checked all the same)."""
        await read_then_write(self._kv, key, lambda entry: (value, None))

    async def _backoff(self, attempt: int) -> None:
        await full_jitter(attempt, self._backoff_initial, self._backoff_max)


async def full_jitter(attempt: int, initial: float, maximum: float) -> None:
    """Wait a random time in ``[0, ceiling]`` ("full jitter"), where the
    ceiling doubles per attempt from ``initial`` up to ``maximum``.

    Full jitter on purpose, unlike the "equal jitter" of
    :class:`emailrelay.supervision.Backoff` that guards a failing server: a
    conflict means the server is fine and another writer just won the same
    key, and the writers that lost should spread out as widely as possible so
    that they stop colliding, not all wait at least half the ceiling. Waits
    are milliseconds, so a retry that comes at once costs one KV round trip."""
    ceiling = min(maximum, initial * 2 ** min(attempt, 16))
    await anyio.sleep(random.uniform(0, ceiling))


def _append_step(
    entry: Entry | None, *, pending: list[str], capacity: int
) -> tuple[bytes | None, _Step]:
    """The page's new value (``None``: write nothing) for appending ``pending``
    to it. Pure: it may run inside the KV adapter, between read and write. An
    id found on the page is not added again (an earlier attempt whose reply was
    lost)."""
    if entry is None:
        return None, _Step(pending, "missing")
    ids = _decode_ids(entry.value)
    present = set(ids)
    remaining = [i for i in pending if i not in present]
    if not remaining:
        return None, _Step([], "done")
    room = capacity - len(ids)
    if room <= 0:
        return None, _Step(remaining, "full")
    chunk = remaining[:room]
    return _encode_ids(ids + chunk), _Step(remaining[len(chunk) :], "wrote")


def _head_step(
    head: Entry | None, span: Entry | None, *, pending: list[str]
) -> tuple[bytes | None, _Step]:
    """:func:`_append_step` for the head, which is created only for an index
    without a range key (``missing`` otherwise: the ids go to the pages)."""
    if head is None and span is not None:
        return None, _Step(pending, "missing")
    if head is None:
        chunk = pending[:HEAD_CAPACITY]
        return _encode_ids(chunk), _Step(pending[len(chunk) :], "wrote")
    return _append_step(head, pending=pending, capacity=HEAD_CAPACITY)


def _touch(entry: Entry | None) -> tuple[bytes | None, Entry | None]:
    return (None if entry is None else entry.value), entry


@dataclass(eq=False)
class _Batch:
    ids: list[str] = field(default_factory=list)
    error: StoreError | None = None


@dataclass(eq=False)
class _Writes:
    """One index's appends in this process: one writer at a time, the rest
    gathering in ``next_batch``."""

    lock: anyio.Lock = field(default_factory=anyio.Lock)
    next_batch: _Batch | None = None
    users: int = 0


def _encode_ids(ids: list[str]) -> bytes:
    return json.dumps(ids).encode()


def _decode_ids(value: bytes) -> list[str]:
    try:
        ids = json.loads(value)
    except ValueError as exc:
        raise CorruptValue("index page is not JSON") from exc
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise CorruptValue("index page is not a JSON array of strings")
    return ids


def _encode_range(first: int, last: int) -> bytes:
    return json.dumps({"first": first, "last": last}).encode()


def _decode_range(value: bytes) -> tuple[int, int]:
    try:
        span = json.loads(value)
        first, last = span["first"], span["last"]
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptValue("index range does not decode") from exc
    if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last + 1):
        raise CorruptValue("index range does not decode")
    return first, last
