"""The tracking store: every read-modify-write on the two KV buckets.

Many replicas write the same keys at once (a hot group's index, one email's
record under a burst of open events), so every write is revision-checked:
``create`` for a new key, ``update(last=revision)`` otherwise, and a
:class:`~emailrelay.store.kv.RevisionConflict` is retried with "full
jitter" backoff (:meth:`TrackingStore._backoff`) until the write lands.
"Retry once" loses writes under load.
A :class:`~emailrelay.store.kv.StoreError` is never read as "not found", and
nothing here ever writes an empty index.

A group's index is a chain of JSON arrays (docs/contract.md, "JetStream KV"): the head,
under :func:`~emailrelay.store.keys.group_key`, holds the first
:data:`HEAD_CAPACITY` ids exactly as the replaced relay wrote them; overflow
pages of :data:`PAGE_CAPACITY` ids follow under
:func:`~emailrelay.store.keys.index_page_key`. Pages fill in order and never
shrink, so every page before the last is full, and an append rewrites one
page of bounded size however large the group grows.
"""

from __future__ import annotations

import json
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import anyio
from pydantic import ValidationError

from emailrelay.api import GROUP_INDEX_BUCKET, RECIPIENTS_BUCKET, TrackingRecord
from emailrelay.metrics import KV_CONFLICTS
from emailrelay.store.keys import group_key, index_page_key, is_valid_key
from emailrelay.store.kv import Entry, KeyValue, RevisionConflict, StoreError, read_then_write

log = logging.getLogger(__name__)

HEAD_CAPACITY = 1000
"""Ids kept in the plain array under the group key (older data may hold more)."""
PAGE_CAPACITY = 1000
"""Ids per overflow page: ~40 KB of uuids, far below the 1 MiB value limit."""

_PAGE_WINDOW = 16  # overflow pages fetched per batch while reading a whole index
_RECORD_BATCH = 250  # record keys per batch get
_RECORD_BATCHES_IN_FLIGHT = 4
_TAIL_HINTS = 4096  # groups whose last page this process remembers


class CorruptValue(StoreError):
    """A stored value that does not decode as what the key should hold."""


class TrackingStore:
    def __init__(
        self,
        records: KeyValue,
        groups: KeyValue,
        conflict_backoff_initial: float = 0.002,
        conflict_backoff_max: float = 0.1,
    ) -> None:
        self._records = records
        self._groups = groups
        self._backoff_initial = conflict_backoff_initial
        self._backoff_max = conflict_backoff_max
        self._groups_in_flight: dict[str, _GroupWrites] = {}
        # Last index page this process wrote per group, so an append to a big
        # group starts near the tail instead of walking every page.
        self._tail_pages: OrderedDict[str, int] = OrderedDict()

    # --- records -----------------------------------------------------------

    async def create_record(self, record: TrackingRecord) -> None:
        """Store a new record. Its key is a fresh uuid4, so a conflict means a
        previous attempt of this same write landed (the reply was lost)."""
        try:
            await self._records.create(record.email_id, record.to_json())
        except RevisionConflict:
            log.debug("record already stored", extra={"email_id": record.email_id})

    async def get_record(self, email_id: str) -> TrackingRecord | None:
        """The record, ``None`` when there is none (or the id cannot be a key).
        Raises :class:`CorruptValue` when it does not decode, :class:`StoreError`
        when the store fails."""
        if not is_valid_key(email_id):
            return None
        entry = await self._records.get(email_id)
        return None if entry is None else _decode_record(entry.value)

    async def get_records(
        self, email_ids: Sequence[str], *, skip_unreadable: bool = False
    ) -> list[TrackingRecord]:
        """The records of ``email_ids`` that exist and decode, in the given
        order, read in concurrent batches (bounded), not one round trip each.

        A store failure raises :class:`StoreError`, unless ``skip_unreadable``
        is set: then the records that could not be read are left out too.
        """
        readable = [i for i in email_ids if is_valid_key(i)]
        batches = [
            readable[start : start + _RECORD_BATCH]
            for start in range(0, len(readable), _RECORD_BATCH)
        ]
        found: list[dict[str, Entry]] = [{} for _ in batches]
        limiter = anyio.CapacityLimiter(_RECORD_BATCHES_IN_FLIGHT)

        async def read_batch(number: int) -> None:
            async with limiter:
                try:
                    found[number] = dict(await self._records.get_many(batches[number]))
                except StoreError:
                    if not skip_unreadable:
                        raise
                    log.warning(
                        "records unreadable; skipped", extra={"count": len(batches[number])}
                    )

        try:
            async with anyio.create_task_group() as tg:
                for number in range(len(batches)):
                    tg.start_soon(read_batch, number)
        except BaseExceptionGroup as group:
            store_errors, other = group.split(StoreError)
            if other is not None:
                raise
            assert store_errors is not None
            raise store_errors.exceptions[0] from group

        records = []
        for batch, entries in zip(batches, found, strict=True):
            for email_id in batch:
                entry = entries.get(email_id)
                if entry is None:
                    continue
                try:
                    records.append(_decode_record(entry.value))
                except CorruptValue:
                    log.warning("tracking record does not decode", extra={"email_id": email_id})
        return records

    async def update_record(
        self, email_id: str, change: Callable[[TrackingRecord], bool]
    ) -> TrackingRecord | None:
        """Apply ``change`` to the stored record, revision-checked, retried on
        conflict until it lands. ``change`` mutates the record it is given and
        returns whether anything changed (nothing to write otherwise); it may be
        called several times, each time on a fresh read. Returns the record as
        stored, or ``None`` when there is no such record."""
        if not is_valid_key(email_id):
            return None
        attempt = 0
        while True:
            entry = await self._records.get(email_id)
            if entry is None:
                return None
            record = _decode_record(entry.value)
            if not change(record):
                return record
            try:
                await self._records.update(email_id, record.to_json(), last=entry.revision)
                return record
            except RevisionConflict:
                KV_CONFLICTS.labels(RECIPIENTS_BUCKET).inc()
                attempt += 1
                await self._backoff(attempt)

    # --- group index: reading ----------------------------------------------

    async def group_ids(self, group_id: str) -> list[str] | None:
        """Every id in the group's index, in index order; ``None`` when there
        is no such group. :class:`StoreError` (or :class:`CorruptValue`) when
        the index cannot be read: never an empty or partial list."""
        head = await self._groups.get(group_key(group_id))
        if head is None:
            return None
        ids = _decode_ids(head.value)
        if len(ids) < HEAD_CAPACITY:
            return ids
        page = 1
        while True:
            keys = [index_page_key(group_id, page + i) for i in range(_PAGE_WINDOW)]
            pages = await self._groups.get_many(keys)
            for key in keys:
                entry = pages.get(key)
                if entry is None:
                    return ids
                page_ids = _decode_ids(entry.value)
                ids.extend(page_ids)
                if len(page_ids) < PAGE_CAPACITY:
                    return ids
            page += _PAGE_WINDOW

    async def group_ids_slice(self, group_id: str, offset: int, limit: int) -> list[str] | None:
        """Ids ``offset`` to ``offset + limit`` (exclusive) of the group's index;
        ``None`` when there is no such group. Reads the head and only the
        overflow pages the slice touches (every page before the last is full,
        so a position maps to one page)."""
        if offset < 0 or limit < 1:
            raise ValueError("offset must be >= 0 and limit >= 1")
        head = await self._groups.get(group_key(group_id))
        if head is None:
            return None
        head_ids = _decode_ids(head.value)
        end = offset + limit
        selected = head_ids[offset:end]
        if len(head_ids) < HEAD_CAPACITY or end <= len(head_ids):
            return selected
        first_page = 1 + (max(offset, len(head_ids)) - len(head_ids)) // PAGE_CAPACITY
        last_page = 1 + (end - 1 - len(head_ids)) // PAGE_CAPACITY
        keys = [index_page_key(group_id, page) for page in range(first_page, last_page + 1)]
        pages = await self._groups.get_many(keys)
        for page, key in enumerate(keys, start=first_page):
            entry = pages.get(key)
            if entry is None:
                break
            page_ids = _decode_ids(entry.value)
            page_start = len(head_ids) + (page - 1) * PAGE_CAPACITY
            selected.extend(page_ids[max(0, offset - page_start) : max(0, end - page_start)])
            if len(page_ids) < PAGE_CAPACITY:
                break
        return selected

    # --- group index: appending --------------------------------------------

    async def append_to_group(self, group_id: str, email_id: str) -> None:
        """Add ``email_id`` to the group's index, exactly once.

        Concurrent appends to one group in this process are coalesced: while
        one write is under way the others gather into the next batch, which
        goes out as a single revision-checked update. A hot group then costs
        one KV round trip per batch instead of a storm of conflicts.
        """
        key = group_key(group_id)
        state = self._groups_in_flight.get(key)
        if state is None:
            state = self._groups_in_flight[key] = _GroupWrites()
        if state.next_batch is None:
            state.next_batch = _Batch()
        batch = state.next_batch
        batch.ids.append(email_id)
        state.users += 1
        try:
            async with state.lock:
                if state.next_batch is batch:
                    state.next_batch = None
                    await self._write_batch(group_id, batch)
        finally:
            state.users -= 1
            if state.users == 0:
                del self._groups_in_flight[key]
        if batch.error is not None:
            raise batch.error

    async def _write_batch(self, group_id: str, batch: _Batch) -> None:
        try:
            await self._append_ids(group_id, batch.ids)
        except StoreError as exc:
            batch.error = exc
        except BaseException:
            # The writer was cancelled; the others in its batch must retry.
            batch.error = StoreError("group index write interrupted")
            raise

    async def _append_ids(self, group_id: str, new_ids: list[str]) -> None:
        """Append to the last page of the chain, starting a new page when it is
        full. An id found on any page read on the way is not added again (an
        earlier attempt whose reply was lost)."""
        head_key = group_key(group_id)
        pending = list(dict.fromkeys(new_ids))
        page = self._tail_pages.get(head_key, 0)
        # Page n > 0 may only be created once page n - 1 was seen full in this call;
        # a tail hint pointing at a missing page is stale (the group was removed).
        previous_full = page == 0
        attempt = 0
        while pending:
            key = head_key if page == 0 else index_page_key(group_id, page)
            capacity = HEAD_CAPACITY if page == 0 else PAGE_CAPACITY
            # The read and the write of one page go to the store together (one
            # crossing into the asyncio loop); _append_step decides in between.
            derive = partial(
                _append_step, pending=pending, capacity=capacity, previous_full=previous_full
            )
            try:
                step, _ = await read_then_write(self._groups, key, derive)
            except RevisionConflict:
                KV_CONFLICTS.labels(GROUP_INDEX_BUCKET).inc()
                attempt += 1
                await self._backoff(attempt)
                continue
            if step.move == "restart":
                page, previous_full = 0, True
                continue
            pending = step.pending
            if step.move == "done":
                break
            if step.move == "next" or pending:
                page, previous_full = page + 1, True
        self._remember_tail(head_key, page)

    def _remember_tail(self, head_key: str, page: int) -> None:
        self._tail_pages[head_key] = page
        self._tail_pages.move_to_end(head_key)
        while len(self._tail_pages) > _TAIL_HINTS:
            self._tail_pages.popitem(last=False)

    async def _backoff(self, attempt: int) -> None:
        """Wait a random time in ``[0, ceiling]`` ("full jitter"), where the
        ceiling doubles per attempt up to ``conflict_backoff_max``.

        Full jitter on purpose, unlike the "equal jitter" of
        :class:`emailrelay.supervision.Backoff` that guards a failing server: a
        conflict means the server is fine and another writer just won the
        same key, and the writers that lost should spread out as widely as
        possible so that they stop colliding, not all wait at least half the
        ceiling. Waits are milliseconds, so a retry that comes at once costs
        one KV round trip."""
        ceiling = min(self._backoff_max, self._backoff_initial * 2 ** min(attempt, 16))
        await anyio.sleep(random.uniform(0, ceiling))


@dataclass(frozen=True)
class _Step:
    """What one page did for an append: the ids still to add, and where to go."""

    pending: list[str]
    move: Literal["wrote", "done", "next", "restart"]
    """``wrote`` (ids added to this page), ``done`` (all of them were there
    already), ``next`` (this page is full), ``restart`` (the page is missing
    and may not be created: the tail hint was stale, start at the head)."""


def _append_step(
    entry: Entry | None, *, pending: list[str], capacity: int, previous_full: bool
) -> tuple[bytes | None, _Step]:
    """The page's new value (``None``: write nothing) for appending ``pending``
    to it. Pure: it may run inside the KV adapter, between read and write. An
    id found on the page is not added again (an earlier attempt whose reply was
    lost). Page n > 0 may only be created once page n - 1 was seen full."""
    if entry is None:
        if not previous_full:
            return None, _Step(pending, "restart")
        chunk = pending[:capacity]
        return json.dumps(chunk).encode(), _Step(pending[len(chunk) :], "wrote")
    ids = _decode_ids(entry.value)
    present = set(ids)
    remaining = [i for i in pending if i not in present]
    if not remaining:
        return None, _Step([], "done")
    room = capacity - len(ids)
    if room <= 0:
        return None, _Step(remaining, "next")
    chunk = remaining[:room]
    return json.dumps(ids + chunk).encode(), _Step(remaining[len(chunk) :], "wrote")


@dataclass(eq=False)
class _Batch:
    ids: list[str] = field(default_factory=list)
    error: StoreError | None = None


@dataclass(eq=False)
class _GroupWrites:
    """One group's appends in this process: one writer at a time, the rest
    gathering in ``next_batch``."""

    lock: anyio.Lock = field(default_factory=anyio.Lock)
    next_batch: _Batch | None = None
    users: int = 0


def _decode_record(value: bytes) -> TrackingRecord:
    try:
        return TrackingRecord.model_validate_json(value)
    except ValidationError as exc:
        raise CorruptValue("tracking record does not decode") from exc


def _decode_ids(value: bytes) -> list[str]:
    try:
        ids = json.loads(value)
    except ValueError as exc:
        raise CorruptValue("group index is not JSON") from exc
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise CorruptValue("group index is not a JSON array of strings")
    return ids
