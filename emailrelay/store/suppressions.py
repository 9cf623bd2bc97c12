"""The suppression list: recipients the relay will not send to again, in the
KV bucket ``email-suppressions``.

Addresses are compared case-insensitively, as SES's own suppression list
does: the key is the unpadded base64url SHA-256 of the lower-cased bare
address, 43 characters of ``[-_a-zA-Z0-9]`` whatever the address holds (any
Unicode, any length), so every address works and no key nears the subject
bound (emailrelay.store.keys). The value keeps the address as first seen,
the reason, the time and a short summary of the SES event (never its
headers): a few hundred bytes.

The KV port has no delete, so :meth:`SuppressionStore.remove` writes a
tombstone (``{"removed_at": ...}``) that reads as "not suppressed" and that a
later :meth:`~SuppressionStore.add` overwrites. Every write is
revision-checked and retried on conflict (replicas apply bounces
concurrently).

Listing (:meth:`SuppressionStore.page`) keeps, per process, the set of
listed keys (tombstones left out) and the bucket revision it is current to.
Each page first reads only the writes made since (any replica's, from the
bucket's stream: :class:`~emailrelay.store.kv.FollowableKeyValue`), then
the page's own entries: a page costs about the page, not the list. The
first page a process serves reads the whole bucket once (about as long as
one page used to take: 1 s for 10,000 entries on a busy 2-core machine); a
page cut off on the way keeps what it read for the next.
Memory: about 100 bytes a listed address.
"""

from __future__ import annotations

import base64
import builtins
import enum
import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio

from emailrelay.addresses import parse_mailbox, strip_line_breaks
from emailrelay.api import format_time
from emailrelay.store.kv import Changes, Entry, ListableKeyValue, RevisionConflict, changes_of

MAX_ADDRESS_CHARS = 320
"""Stored addresses are cut to this (RFC 5321 allows 256 octets for a path;
the key is made from the whole address, so a cut never merges two)."""
MAX_DETAIL_CHARS = 256
"""Each event detail kept is cut to this: the record stays small."""
MAX_PAGE = 1000


class SuppressionReason(enum.StrEnum):
    BOUNCE = "bounce"
    """A Permanent bounce named this recipient."""
    COMPLAINT = "complaint"
    """The recipient marked a message as spam."""
    MANUAL = "manual"
    """An operator added it (CLI, ``suppression.add``)."""


@dataclass(frozen=True)
class Suppression:
    """One suppressed recipient. ``event``: what the SES event said about it
    (feedback id, SES message id, bounce type and status, complaint type)."""

    address: str
    reason: SuppressionReason
    suppressed_at: datetime
    event: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "address": self.address[:MAX_ADDRESS_CHARS],
                "reason": self.reason.value,
                "suppressed_at": format_time(self.suppressed_at),
                "event": {k[:64]: v[:MAX_DETAIL_CHARS] for k, v in self.event.items()},
            },
            separators=(",", ":"),
        ).encode("ascii")


def normalize_address(address: str) -> str:
    """The form addresses are compared in: the bare address of a mailbox
    (``Name <a@b>`` -> ``a@b``), lower-cased; text that is not a mailbox is
    compared as it is, trimmed and lower-cased (it still gets a key)."""
    cleaned = strip_line_breaks(address).strip()
    mailbox = parse_mailbox(cleaned)
    return (mailbox.address if mailbox is not None else cleaned).lower()


def suppression_key(address: str) -> str:
    digest = hashlib.sha256(normalize_address(address).encode("utf-8", "surrogatepass")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


class SuppressionStore:
    """``email-suppressions`` over the KV port (with key listing, for :meth:`list`).

    Store failures (:class:`~emailrelay.store.kv.StoreError`) pass through:
    the send path decides whether an unreadable list blocks a send."""

    def __init__(self, kv: ListableKeyValue, conflict_backoff: float = 0.01) -> None:
        self._kv = kv
        self._backoff = conflict_backoff
        self._listed = _ListedKeys()
        self._following = anyio.Lock()

    async def get(self, address: str) -> Suppression | None:
        entry = await self._kv.get(suppression_key(address))
        return None if entry is None else _decode(entry)

    async def is_suppressed(self, address: str) -> bool:
        return await self.get(address) is not None

    async def add(self, suppression: Suppression) -> bool:
        """Suppress the address; ``False`` when it already was (the first
        record is kept: it says when and why sending first stopped)."""
        key = suppression_key(suppression.address)
        value = suppression.to_json()
        return await self._write(key, lambda current: None if current is not None else value)

    async def remove(self, address: str, now: datetime | None = None) -> bool:
        """Allow sending to the address again; ``False`` when it was not suppressed."""
        tombstone = json.dumps({"removed_at": format_time(now or datetime.now(UTC))}).encode()
        return await self._write(
            suppression_key(address),
            lambda current: tombstone if current is not None else None,
        )

    async def erase(self, address: str) -> bool:
        """Purge the address's entry (every revision): erasure of the
        recipient's data when asked for. ``False`` when there was none."""
        key = suppression_key(address)
        if await self._kv.get(key) is None:
            return False
        await self._kv.purge(key)
        return True

    async def list(self, limit: int = 100, offset: int = 0) -> builtins.list[Suppression]:
        """Suppressed addresses ``offset`` to ``offset + limit`` (see :meth:`page`)."""
        suppressions, _ = await self.page(limit, offset)
        return suppressions

    async def page(
        self, limit: int = 100, offset: int = 0
    ) -> tuple[builtins.list[Suppression], bool]:
        """Suppressed addresses ``offset`` to ``offset + limit`` in key order
        (stable between calls while the list does not change), and whether
        more follow. Positions count listed addresses only, never removal
        tombstones. An entry removed between the listing and the read of
        its page is left out (the page is then shorter)."""
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise ValueError(f"limit must be 1 to {MAX_PAGE} and offset >= 0")
        listed = await self._follow()
        window = listed[offset : offset + limit]
        entries = await self._kv.get_many(window)
        found: builtins.list[Suppression] = []
        for key in window:
            entry = entries.get(key)
            suppression = None if entry is None else _decode(entry)
            if suppression is not None:
                found.append(suppression)
        return found, len(listed) > offset + limit

    async def _follow(self) -> Sequence[str]:
        """The listed keys, sorted, brought up to the bucket's latest writes.
        One caller at a time reads them; the others then find nothing new."""
        async with self._following:
            while True:
                changes = await changes_of(self._kv, self._listed.revision)
                moved = changes.epoch != self._listed.epoch and self._listed.revision != 0
                if moved and not changes.complete:
                    self._listed = _ListedKeys()  # a new bucket: start over
                    continue
                self._listed.apply(changes)
                if not changes.more:
                    return self._listed.sorted()

    async def _write(self, key: str, change: Callable[[Suppression | None], bytes | None]) -> bool:
        """Read, let ``change(current suppression or None)`` give the new
        value (``None``: leave it), write it at the read revision; retry a
        lost race."""
        delay = self._backoff
        while True:
            entry = await self._kv.get(key)
            current = None if entry is None else _decode(entry)
            value = change(current)
            if value is None:
                return False
            try:
                if entry is None:
                    await self._kv.create(key, value)
                else:
                    await self._kv.update(key, value, last=entry.revision)
            except RevisionConflict:
                await anyio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 1.0)
                continue
            return True


class _ListedKeys:
    """The listed keys as of ``revision`` of the bucket's ``epoch``."""

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.revision = 0
        self._keys: set[str] = set()
        self._sorted: builtins.list[str] | None = []

    def apply(self, changes: Changes) -> None:
        if changes.complete:
            self._keys = set()
        for change in changes.changes:
            if change.entry is not None and _decode(change.entry) is not None:
                self._keys.add(change.key)
            else:
                self._keys.discard(change.key)
        if changes.changes or changes.complete:
            self._sorted = None
        self.epoch, self.revision = changes.epoch, changes.revision

    def sorted(self) -> builtins.list[str]:
        if self._sorted is None:
            self._sorted = sorted(self._keys)
        return self._sorted


def _decode(entry: Entry) -> Suppression | None:
    """The suppression an entry holds; ``None`` for a tombstone. An entry
    that does not decode still suppresses (fail safe): its address is then
    unknown here."""
    try:
        value = json.loads(entry.value)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict) and "removed_at" in value and "reason" not in value:
        return None
    if not isinstance(value, dict):
        value = {}
    try:
        event = value.get("event")
        return Suppression(
            address=str(value["address"]),
            reason=SuppressionReason(value["reason"]),
            suppressed_at=datetime.fromisoformat(value["suppressed_at"]),
            event={str(k): str(v) for k, v in event.items()} if isinstance(event, dict) else {},
        )
    except (KeyError, ValueError, TypeError):
        return Suppression("", SuppressionReason.MANUAL, datetime.fromtimestamp(0, UTC))
