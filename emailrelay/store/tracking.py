"""The tracking store: every read-modify-write on the two KV buckets.

Many replicas write the same keys at once (a hot group's index, one email's
record under a burst of open events), so every write is revision-checked:
``create`` for a new key, ``update(last=revision)`` otherwise, and a
:class:`~emailrelay.store.kv.RevisionConflict` is retried with jittered
backoff until the write lands. "Retry once" loses writes under load.
A :class:`~emailrelay.store.kv.StoreError` is never read as "not found".
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from pydantic import ValidationError

from emailrelay.api import GROUP_INDEX_BUCKET, RECIPIENTS_BUCKET, TrackingRecord
from emailrelay.metrics import KV_CONFLICTS
from emailrelay.store.keys import group_key, is_valid_key
from emailrelay.store.kv import KeyValue, RevisionConflict, StoreError

log = logging.getLogger(__name__)


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

    async def append_to_group(self, group_id: str, email_id: str) -> None:
        """Add ``email_id`` to the group's index (a JSON array), exactly once.

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
                    await self._write_batch(key, batch)
        finally:
            state.users -= 1
            if state.users == 0:
                del self._groups_in_flight[key]
        if batch.error is not None:
            raise batch.error

    async def _write_batch(self, key: str, batch: _Batch) -> None:
        try:
            await self._append_ids(key, batch.ids)
        except StoreError as exc:
            batch.error = exc
        except BaseException:
            # The writer was cancelled; the others in its batch must retry.
            batch.error = StoreError("group index write interrupted")
            raise

    async def _append_ids(self, key: str, new_ids: list[str]) -> None:
        attempt = 0
        while True:
            entry = await self._groups.get(key)
            try:
                if entry is None:
                    await self._groups.create(key, json.dumps(new_ids).encode())
                    return
                ids = _decode_ids(entry.value)
                present = set(ids)
                # An id already there comes from an earlier attempt whose reply was lost.
                missing = [i for i in new_ids if i not in present]
                if not missing:
                    return
                ids.extend(missing)
                await self._groups.update(key, json.dumps(ids).encode(), last=entry.revision)
                return
            except RevisionConflict:
                KV_CONFLICTS.labels(GROUP_INDEX_BUCKET).inc()
                attempt += 1
                await self._backoff(attempt)

    async def _backoff(self, attempt: int) -> None:
        ceiling = min(self._backoff_max, self._backoff_initial * 2 ** min(attempt, 16))
        await anyio.sleep(random.uniform(0, ceiling))


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
