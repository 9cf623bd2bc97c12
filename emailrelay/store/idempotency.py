"""Idempotent sends across replicas: one KV entry per caller key in
``email-idempotency``.

A caller that times out and retries must not send the email twice. The first
request with a key *reserves* it with ``create`` (atomic in JetStream: of any
number of replicas racing, exactly one wins); the others read the entry and
answer from it. The entry moves through these states, each write
revision-checked against the revision the writer last saw (so a write never
lands on an entry another replica changed meanwhile)::

    (absent) --create--> in_progress --complete-----> completed  (answers the reply)
                             |       --mark_unknown-> unknown    (answers "outcome unknown")
                             |       --release------> released   (free again)
                             +-- older than stale_after: read as unknown (owner crashed)

``released`` exists because the KV port has no delete: a released entry is
free, and the next reservation overwrites it (``update`` at its revision, so
again one winner). Any entry whose last write is older than the TTL is free
too: JetStream's ``max_age`` normally drops it first, and reading the age here
keeps the rule on a bucket created without ``max_age`` (and lets tests use a
fake clock).

Keys: a caller's key (at most :data:`MAX_KEY_LENGTH` characters, any text) is
stored under the unpadded base64url SHA-256 of its UTF-8 bytes: 43 characters
of ``[-_a-zA-Z0-9]``, valid for KV and far below the subject bound of
emailrelay.store.keys, whatever the caller sent. Two keys share an entry only
on a SHA-256 collision.

Times are wall-clock Unix seconds, because replicas compare them: an entry's
age decides both staleness (``SEND_TIMEOUT`` plus a grace, seconds) and expiry
(hours), both far above normal clock skew.

The one window that can still duplicate: the provider accepted the message
and the process died (or the store failed for good) before :meth:`complete`
landed. The entry then stays ``in_progress`` and, after ``stale_after``, reads
as ``unknown``: a retry gets ``email delivery outcome unknown``, not a second
message. A duplicate needs the entry itself lost (bucket deleted, TTL shorter
than the caller's retries), not just a crash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from emailrelay import api
from emailrelay.store.kv import Entry, KeyValue, RevisionConflict
from emailrelay.supervision import Backoff

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 256
"""The longest idempotency key a caller may give (characters); a longer one
is an ``invalid request payload``."""

DEFAULT_TTL = 24 * 3600.0

_RACE_ATTEMPTS = 20
"""Reads and writes one :meth:`IdempotencyStore.reserve` makes at most. Each
lost write means another replica reserved or freed the entry; only a free
entry is written to, so this many lost races in a row does not happen in
practice and is reported as a conflict rather than looped on."""

_POLL_INITIAL = 0.05
_POLL_MAX = 1.0

_FINGERPRINT_FIELDS = (
    "to",
    "subject",
    "html",
    "text",
    "from_",
    "from_display_name",
    "reply_to",
    "group_id",
)
"""Every field that changes the message sent or the reply: so two requests
with the same fingerprint would send the same email to the same recipient and
answer the same ``group_id``. Left out: fields the contract ignores, the
idempotency key itself, and headers (deadline, tracing), which describe the
attempt, not the email."""


def request_fingerprint(request: api.SendEmailRequest) -> str:
    """SHA-256 (hex) of the request's :data:`_FINGERPRINT_FIELDS`, as the
    caller sent them: an absent field and an empty one are the same (the
    contract says so), anything else differs (even a changed space, since it
    changes the message). The canonical form is a versioned JSON array, so no
    choice of values can make two field lists encode alike."""
    values = [getattr(request, name) for name in _FINGERPRINT_FIELDS]
    canonical = json.dumps(["send_email/v1", values], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def entry_key(idempotency_key: str) -> str:
    """The KV key of a caller's idempotency key (see the module docstring)."""
    digest = hashlib.sha256(idempotency_key.encode("utf-8", "surrogatepass")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


# --- What a reservation attempt answers ---------------------------------------


@dataclass(frozen=True)
class Reserved:
    """This request owns the key: send, then :meth:`IdempotencyStore.complete`,
    :meth:`~IdempotencyStore.release` or :meth:`~IdempotencyStore.mark_unknown`."""

    key: str
    revision: int
    fingerprint: str
    owner: str
    started_at: float


@dataclass(frozen=True)
class Completed:
    """The email was sent: answer this reply again (same ``email_id``)."""

    reply: api.SendEmailReply


@dataclass(frozen=True)
class InProgress:
    """Another request with this key is sending now (since ``since``, Unix time)."""

    since: float


@dataclass(frozen=True)
class Mismatch:
    """The key belongs to a different request: ``idempotency key reused ...``."""


@dataclass(frozen=True)
class OutcomeUnknown:
    """The first send may or may not have been delivered (dropped after the
    hand-over, or its owner vanished): ``email delivery outcome unknown``."""


Reservation = Reserved | Completed | InProgress | Mismatch | OutcomeUnknown


class ReservationLost(Exception):
    """The entry changed under its owner (it expired and was taken again):
    the owner's outcome could not be stored."""


# --- The store ----------------------------------------------------------------

_IN_PROGRESS = "in_progress"
_COMPLETED = "completed"
_UNKNOWN = "unknown"
_RELEASED = "released"


class IdempotencyStore:
    """Reservations in ``email-idempotency`` over the three-outcome KV port.

    ``stale_after``: seconds after which an entry still in progress is read
    as :class:`OutcomeUnknown` (``SEND_TIMEOUT`` plus a grace: its owner
    crashed). ``ttl``: seconds after its last write an entry is forgotten
    (``IDEMPOTENCY_TTL``). ``wall_clock``: Unix time, injectable for tests.
    Store failures (:class:`~emailrelay.store.kv.StoreError`) pass through:
    the caller decides (a send should fail rather than risk a duplicate).
    """

    def __init__(
        self,
        kv: KeyValue,
        *,
        stale_after: float,
        ttl: float = DEFAULT_TTL,
        wall_clock: Callable[[], float] = time.time,
        new_owner: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._kv = kv
        self._stale_after = stale_after
        self._ttl = ttl
        self._wall_clock = wall_clock
        self._new_owner = new_owner

    async def reserve(self, idempotency_key: str, fingerprint: str) -> Reservation:
        """Reserve the key for this request, or say what it already holds."""
        key = entry_key(idempotency_key)
        for _ in range(_RACE_ATTEMPTS):
            entry = await self._kv.get(key)
            now = self._wall_clock()
            if entry is not None:
                state = _decode(entry)
                if not self._is_free(state, now):
                    return self._answer(state, fingerprint, now)
            owner = self._new_owner()
            value = _encode(
                {
                    "state": _IN_PROGRESS,
                    "fingerprint": fingerprint,
                    "owner": owner,
                    "started_at": now,
                    "updated_at": now,
                }
            )
            try:
                if entry is None:
                    revision = await self._kv.create(key, value)
                else:
                    revision = await self._kv.update(key, value, last=entry.revision)
            except RevisionConflict:
                continue  # another request took (or freed) it first: read again
            return Reserved(key, revision, fingerprint, owner, now)
        raise RevisionConflict(f"{key}: lost {_RACE_ATTEMPTS} races in a row")

    async def wait_for_outcome(
        self, idempotency_key: str, fingerprint: str, until: float
    ) -> Reservation:
        """:meth:`reserve` again and again, with capped backoff, while another
        request holds the key in progress, until ``until`` (on
        :func:`anyio.current_time`'s clock). The answer may be
        :class:`Reserved`: the first owner released the key (its send failed
        before the hand-over), so this request may send now. Still
        :class:`InProgress` at ``until`` means the caller's time is up.

        Polls rather than watches: the KV port has no watch, and one read per
        backoff step per waiting request is cheap next to a send."""
        backoff = Backoff(_POLL_INITIAL, _POLL_MAX)
        attempt = 0
        while True:
            answer = await self.reserve(idempotency_key, fingerprint)
            left = until - anyio.current_time()
            if not isinstance(answer, InProgress) or left <= 0:
                return answer
            attempt += 1
            await anyio.sleep(min(left, backoff.delay(attempt)))

    async def complete(self, reserved: Reserved, reply: api.SendEmailReply) -> None:
        """The provider accepted the message: later requests with this key
        get ``reply``."""
        await self._finish(reserved, _COMPLETED, {"reply": reply.model_dump()})

    async def release(self, reserved: Reserved) -> None:
        """The send failed before the message was handed over: the key holds
        nothing, so a retry may send."""
        await self._finish(reserved, _RELEASED, {})

    async def mark_unknown(self, reserved: Reserved) -> None:
        """The whole message was handed over but no answer came: a retry must
        not send again, and gets ``email delivery outcome unknown``."""
        await self._finish(reserved, _UNKNOWN, {})

    async def _finish(self, reserved: Reserved, state: str, extra: dict[str, Any]) -> None:
        value = _encode(
            {
                "state": state,
                "fingerprint": reserved.fingerprint,
                "owner": reserved.owner,
                "started_at": reserved.started_at,
                "updated_at": self._wall_clock(),
                **extra,
            }
        )
        try:
            await self._kv.update(reserved.key, value, last=reserved.revision)
        except RevisionConflict as exc:
            # Only the owner writes an in-progress entry, so it changed only
            # by expiring and being reserved again (TTL shorter than a send).
            raise ReservationLost(reserved.key) from exc

    def _is_free(self, state: dict[str, Any] | None, now: float) -> bool:
        if state is None:
            return False  # unreadable: never overwrite what might be a sent email
        if state.get("state") == _RELEASED:
            return True
        updated_at = state.get("updated_at")
        return isinstance(updated_at, int | float) and now - updated_at >= self._ttl

    def _answer(self, state: dict[str, Any] | None, fingerprint: str, now: float) -> Reservation:
        if state is None:
            log.warning("idempotency entry unreadable; answering outcome unknown")
            return OutcomeUnknown()
        if state.get("fingerprint") != fingerprint:
            return Mismatch()
        kind = state.get("state")
        if kind == _COMPLETED:
            try:
                return Completed(api.SendEmailReply.model_validate(state.get("reply")))
            except ValueError:
                log.warning("idempotency entry holds no readable reply")
                return OutcomeUnknown()
        if kind == _IN_PROGRESS:
            since = state.get("started_at")
            if isinstance(since, int | float) and now - since < self._stale_after:
                return InProgress(float(since))
        # unknown, stale in progress, or a state a newer version wrote
        return OutcomeUnknown()


def _encode(state: dict[str, Any]) -> bytes:
    # ASCII-only JSON: any text (even a lone surrogate) round-trips.
    return json.dumps({"v": 1, **state}, separators=(",", ":")).encode("ascii")


def _decode(entry: Entry) -> dict[str, Any] | None:
    try:
        value = json.loads(entry.value)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
