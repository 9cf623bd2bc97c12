"""The tracking store: every read-modify-write on the tracking buckets.

Many replicas write the same keys at once (a hot group's index, one email's
record under a burst of open events), so every write is revision-checked:
``create`` for a new key, ``update(last=revision)`` otherwise, and a
:class:`~emailrelay.store.kv.RevisionConflict` is retried with "full
jitter" backoff (:func:`~emailrelay.store.index.full_jitter`) until the write lands.
"Retry once" loses writes under load.
A :class:`~emailrelay.store.kv.StoreError` is never read as "not found", and
nothing here ever writes an empty index.

A group's index, and a recipient's (the ids of the records addressed to one
bare address, keyed by its hash: what an erasure starts from), are paged
indexes: :mod:`emailrelay.store.index` describes their layout.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import anyio
from pydantic import ValidationError

from emailrelay import api
from emailrelay.api import RECIPIENTS_BUCKET, TrackingRecord
from emailrelay.metrics import KV_CONFLICTS
from emailrelay.store.index import (
    HEAD_CAPACITY,
    PAGE_CAPACITY,
    CorruptValue,
    PagedIndex,
    full_jitter,
)
from emailrelay.store.keys import is_valid_key
from emailrelay.store.kv import Entry, KeyValue, RevisionConflict, StoreError, one_store_error
from emailrelay.store.suppressions import normalize_address, suppression_key

log = logging.getLogger(__name__)

__all__ = ["HEAD_CAPACITY", "PAGE_CAPACITY", "CorruptValue", "Erasure", "TrackingStore"]

_RECORD_BATCH = 250  # record keys per batch get
_RECORD_BATCHES_IN_FLIGHT = 4


def recipient_key(address: str) -> str:
    """The recipient index's name for an address: the suppression list's key
    (base64url SHA-256 of the lower-cased bare address), so it holds no address."""
    return suppression_key(address)


class TrackingStore:
    def __init__(
        self,
        records: KeyValue,
        groups: KeyValue,
        conflict_backoff_initial: float = 0.002,
        conflict_backoff_max: float = 0.1,
        *,
        recipients: KeyValue | None = None,
        expiring: bool = False,
    ) -> None:
        """``recipients``: the recipient index's bucket (``None``: not kept,
        and erasure unavailable). ``expiring``: the buckets have a
        ``max_age`` (RETENTION), so the indexes keep their range keys alive."""
        self._records = records
        self._backoff_initial = conflict_backoff_initial
        self._backoff_max = conflict_backoff_max
        backoff = {"backoff_initial": conflict_backoff_initial, "backoff_max": conflict_backoff_max}
        self._group_index = PagedIndex(
            groups, api.GROUP_INDEX_BUCKET, touch_range=expiring, **backoff
        )
        self._recipient_index = (
            None
            if recipients is None
            else PagedIndex(recipients, api.RECIPIENT_INDEX_BUCKET, touch_range=expiring, **backoff)
        )
        self._after_erasure: list[Callable[[str], Awaitable[object]]] = []

    def after_erasure(self, hook: Callable[[str], Awaitable[object]]) -> None:
        """Run ``hook(address)`` after every erasure of a recipient's records
        (the dev stack deletes its captured messages to that address)."""
        self._after_erasure.append(hook)

    # --- records -----------------------------------------------------------

    async def create_record(self, record: TrackingRecord) -> None:
        """Store a new record, and its id in its recipient's index (both at
        once). The key is a fresh uuid4, so a conflict means a previous
        attempt of this same write landed (the reply was lost); the index
        entry is written all the same (an append skips an id already there)."""
        if self._recipient_index is None:
            await self._create(record)
            return
        index = self._recipient_index
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._create, record)
                tg.start_soon(index.append, recipient_key(record.to), record.email_id)
        except BaseExceptionGroup as group:
            raise one_store_error(group) from group

    async def _create(self, record: TrackingRecord) -> None:
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
            raise one_store_error(group) from group

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

    # --- group index -------------------------------------------------------

    async def group_ids(self, group_id: str) -> list[str] | None:
        """Every id in the group's index, in index order, each once; ``None``
        when there is no such group. :class:`StoreError` (or
        :class:`CorruptValue`) when the index cannot be read: never an empty
        or partial list."""
        return await self._group_index.ids(group_id)

    async def group_ids_slice(self, group_id: str, offset: int, limit: int) -> list[str] | None:
        """Ids ``offset`` to ``offset + limit`` (exclusive) of :meth:`group_ids`;
        ``None`` when there is no such group."""
        return await self._group_index.ids_slice(group_id, offset, limit)

    async def append_to_group(self, group_id: str, email_id: str) -> None:
        """Add ``email_id`` to the group's index, exactly once (concurrent
        appends to one group are coalesced: see :class:`PagedIndex`)."""
        await self._group_index.append(group_id, email_id)

    # --- erasure by recipient ----------------------------------------------

    async def erase_recipient(self, address: str, also: Iterable[str] = ()) -> Erasure:
        """Remove every record addressed to ``address`` (bare address,
        case-insensitive) and its id from every group index, found through
        the recipient index, plus the records among ``also`` (ids found by a
        scan) that are addressed to it.

        Safe to repeat after a failure (:class:`StoreError`): group-index
        entries go first, then the records, then the recipient index, so
        what is left is still found the next time."""
        if self._recipient_index is None:
            raise StoreError(f"bucket {api.RECIPIENT_INDEX_BUCKET} is not available")
        name = recipient_key(address)
        indexed = await self._recipient_index.ids(name) or []
        candidates = list(dict.fromkeys([*indexed, *also]))
        wanted = normalize_address(address)
        by_group: dict[str, list[str]] = {}
        for record in await self.get_records(candidates):
            if normalize_address(record.to) == wanted:
                by_group.setdefault(record.group_id, []).append(record.email_id)
        entries = 0
        for group_id, email_ids in by_group.items():
            entries += await self._group_index.remove(group_id, email_ids)
        erased = [email_id for email_ids in by_group.values() for email_id in email_ids]
        for email_id in erased:
            await self._records.purge(email_id)
        if indexed:
            await self._recipient_index.remove(name, indexed)
            await self._recipient_index.purge_if_empty(name)
        for hook in self._after_erasure:
            await hook(address)
        return Erasure(records=len(erased), index_entries=entries)

    async def _backoff(self, attempt: int) -> None:
        await full_jitter(attempt, self._backoff_initial, self._backoff_max)


@dataclass(frozen=True)
class Erasure:
    """What one erasure removed: records, and their entries in group indexes."""

    records: int
    index_entries: int


def _decode_record(value: bytes) -> TrackingRecord:
    try:
        return TrackingRecord.model_validate_json(value)
    except ValidationError as exc:
        raise CorruptValue("tracking record does not decode") from exc
