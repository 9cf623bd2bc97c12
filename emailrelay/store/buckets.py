"""Opening the two tracking buckets, and opening them again when they vanish.

A bucket can disappear under a running relay: an operator deletes it by
mistake, a GitOps tool deletes and re-declares it. Left alone, every write to
it fails until a restart. So each bucket is held by a :class:`ReopeningBucket`:
when the adapter reports :class:`~emailrelay.store.kv.BucketMissing` (JetStream
said the stream is gone, never a guess from a timeout), it opens the bucket
again, or with ``KV_AUTO_CREATE=true`` creates it with the deployment's
settings, and retries the call once on the fresh handle. After an attempt
that found nothing (``KV_AUTO_CREATE=false``, or JetStream not answering) it
looks again at most once per ``retry_interval`` and fails fast meanwhile, so a
send is not held up by a bucket that is not there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import anyio

from emailrelay import api
from emailrelay.metrics import KV_BUCKET_REOPENS
from emailrelay.store.kv import (
    BucketMissing,
    Changes,
    Derive,
    DerivePair,
    Entry,
    KeyValue,
    ListableKeyValue,
    StoreError,
    changes_of,
    read_pair_then_write,
    read_then_write,
)
from emailrelay.store.tracking import TrackingStore

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BucketSpec:
    """A bucket as the deployment creates it (history 1, file storage, direct gets)."""

    name: str
    max_value_size: int
    max_age: float = 0.0
    """Seconds an entry lives after its last write (JetStream ``max_age``);
    0 keeps entries for ever, as the tracking buckets do unless RETENTION is set."""
    check_age: bool = False
    """Warn when an existing bucket's ``max_age`` differs (RETENTION buckets)."""


RECIPIENTS = BucketSpec(api.RECIPIENTS_BUCKET, 64 * 1024)
GROUP_INDEX = BucketSpec(api.GROUP_INDEX_BUCKET, 1024 * 1024)

RECIPIENT_INDEX = BucketSpec(api.RECIPIENT_INDEX_BUCKET, 1024 * 1024)


def tracking_buckets(retention: float = 0.0) -> tuple[BucketSpec, BucketSpec, BucketSpec]:
    """Records, group index and recipient index, with RETENTION (seconds,
    0: for ever) as their ``max_age``."""

    def aged(spec: BucketSpec) -> BucketSpec:
        return BucketSpec(spec.name, spec.max_value_size, max_age=retention, check_age=True)

    return aged(RECIPIENTS), aged(GROUP_INDEX), aged(RECIPIENT_INDEX)


SUPPRESSIONS = BucketSpec(api.SUPPRESSIONS_BUCKET, 16 * 1024)
"""Kept until an operator removes an address (no ``max_age``): SES itself
keeps its account-level suppressions until removed. Records are small
(emailrelay.store.suppressions bounds them far below this)."""

IDEMPOTENCY_MAX_VALUE = 128 * 1024
"""An entry holds the reply, whose ``group_id`` may be 16 KiB of UTF-8 and
JSON-escaping can grow control characters sixfold (96 KiB at worst)."""


def suppressions_bucket(retention: float = 0.0) -> BucketSpec:
    """``email-suppressions`` with SUPPRESSION_RETENTION (0: for ever) as its
    ``max_age``: a bounced address stays suppressed after its records expire."""
    return BucketSpec(SUPPRESSIONS.name, SUPPRESSIONS.max_value_size, max_age=retention)


def idempotency_bucket(ttl: float) -> BucketSpec:
    """``email-idempotency`` with ``IDEMPOTENCY_TTL`` as its ``max_age``: a key
    is remembered for ``ttl`` seconds after its last write, then JetStream
    drops it (emailrelay.store.idempotency also treats older entries as gone,
    so a bucket created without ``max_age`` keeps the same rules)."""
    return BucketSpec(api.IDEMPOTENCY_BUCKET, IDEMPOTENCY_MAX_VALUE, max_age=ttl)


@dataclass(frozen=True)
class BucketPolicy:
    """What the relay may do about a missing bucket (``KV_AUTO_CREATE``, ``KV_REPLICAS``)."""

    auto_create: bool
    replicas: int = 1


@runtime_checkable
class AgedBucket(Protocol):
    async def max_age(self) -> float:
        """The bucket's ``max_age`` in seconds (0: for ever)."""
        ...


class BucketHost(Protocol):
    """Where buckets are opened and created (the NATS connection)."""

    async def key_value(self, bucket: str) -> ListableKeyValue | None:
        """The bucket, ``None`` when it does not exist; :class:`StoreError`
        when JetStream cannot say."""
        ...

    async def create_key_value(
        self, bucket: str, max_value_size: int, replicas: int, max_age: float = 0.0
    ) -> ListableKeyValue:
        """Create the bucket (``max_age`` seconds per entry, 0: for ever);
        :class:`StoreError` when that fails."""
        ...


async def open_bucket(
    host: BucketHost, spec: BucketSpec, policy: BucketPolicy
) -> ListableKeyValue | None:
    """The bucket, created when missing and the policy allows; ``None`` when
    it is missing. :class:`StoreError` when JetStream is not available."""
    kv, _ = await _open_or_create(host, spec, policy)
    return kv


async def _open_or_create(
    host: BucketHost, spec: BucketSpec, policy: BucketPolicy
) -> tuple[ListableKeyValue | None, str]:
    kv = await host.key_value(spec.name)
    if kv is not None:
        if spec.check_age:
            await _warn_if_age_differs(kv, spec)
        return kv, "reopened"
    if not policy.auto_create:
        return None, "missing"
    try:
        kv = await host.create_key_value(
            spec.name, spec.max_value_size, policy.replicas, spec.max_age
        )
    except StoreError:
        # Another replica may have won the race (with settings of its own);
        # use its bucket if it is there now.
        kv = await host.key_value(spec.name)
        if kv is None:
            raise
        return kv, "reopened"
    log.info("created KV bucket", extra={"bucket": spec.name})
    return kv, "created"


async def _warn_if_age_differs(kv: ListableKeyValue, spec: BucketSpec) -> None:
    """An operator's bucket is never rewritten: say once that its age limit
    is not the one RETENTION asks for."""
    if not isinstance(kv, AgedBucket):
        return
    try:
        actual = await kv.max_age()
    except StoreError:
        return
    if abs(actual - spec.max_age) > 0.5:
        log.warning(
            "KV bucket max_age differs from RETENTION; the bucket is left as it is",
            extra={"bucket": spec.name, "bucket_max_age": actual, "retention": spec.max_age},
        )


class ReopeningBucket:
    """:class:`~emailrelay.store.kv.KeyValue` that survives its bucket being
    deleted: see the module docstring."""

    def __init__(
        self,
        host: BucketHost,
        spec: BucketSpec,
        policy: BucketPolicy,
        kv: ListableKeyValue,
        retry_interval: float = 1.0,
    ) -> None:
        self._host = host
        self._spec = spec
        self._policy = policy
        self._kv = kv
        self._retry_interval = retry_interval
        self._lock = anyio.Lock()
        self._failed_at = -math.inf

    async def get(self, key: str) -> Entry | None:
        return await self._call(lambda kv: kv.get(key))

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, Entry]:
        return await self._call(lambda kv: kv.get_many(keys))

    async def keys(self) -> list[str]:
        return await self._call(lambda kv: kv.keys())

    async def changes(self, after: int) -> Changes:
        """See :class:`~emailrelay.store.kv.FollowableKeyValue`; a re-opened
        bucket has another ``epoch``, so followers start over."""
        return await self._call(lambda kv: changes_of(kv, after))

    async def create(self, key: str, value: bytes) -> int:
        return await self._call(lambda kv: kv.create(key, value))

    async def update(self, key: str, value: bytes, last: int) -> int:
        return await self._call(lambda kv: kv.update(key, value, last))

    async def purge(self, key: str, last: int | None = None) -> None:
        await self._call(lambda kv: kv.purge(key, last))

    async def read_then_write(self, key: str, derive: Derive[T]) -> tuple[T, int | None]:
        return await self._call(lambda kv: read_then_write(kv, key, derive))

    async def read_pair_then_write(
        self, key: str, other: str, derive: DerivePair[T]
    ) -> tuple[T, int | None]:
        return await self._call(lambda kv: read_pair_then_write(kv, key, other, derive))

    async def _call(self, operation: Callable[[ListableKeyValue], Awaitable[T]]) -> T:
        kv = self._kv
        try:
            return await operation(kv)
        except BucketMissing:
            if not await self._reopen(kv):
                raise
        # A create that failed on the old bucket did not land: retrying it on
        # the new one is still a first attempt.
        return await operation(self._kv)

    async def _reopen(self, failed: ListableKeyValue) -> bool:
        """Open (or create) the bucket again, once for all the calls that
        found it missing; ``True`` when a fresh handle is there to retry on."""
        async with self._lock:
            if self._kv is not failed:
                return True  # another call re-opened it meanwhile
            if anyio.current_time() - self._failed_at < self._retry_interval:
                return False
            try:
                fresh, outcome = await _open_or_create(self._host, self._spec, self._policy)
            except StoreError as exc:
                self._failed_at = anyio.current_time()
                KV_BUCKET_REOPENS.labels(self._spec.name, "failed").inc()
                log.warning(
                    "KV bucket missing and could not be opened again",
                    extra={"bucket": self._spec.name, "error": str(exc)},
                )
                return False
            KV_BUCKET_REOPENS.labels(self._spec.name, outcome).inc()
            if fresh is None:
                self._failed_at = anyio.current_time()
                log.warning(
                    "KV bucket missing and KV_AUTO_CREATE=false: tracking waits for it",
                    extra={"bucket": self._spec.name},
                )
                return False
            log.warning("KV bucket was missing; %s", outcome, extra={"bucket": self._spec.name})
            self._kv = fresh
            return True


async def open_tracking_store(
    host: BucketHost, policy: BucketPolicy, retention: float = 0.0
) -> TrackingStore | None:
    """The record and group-index buckets, created with the deployment's
    settings (``retention`` seconds as their ``max_age``, 0: for ever) when
    missing and allowed, each re-opened when it vanishes later. ``None``
    turns tracking off (the caller looks again later). The recipient index
    is opened or created the same way; without it tracking still works, but
    records are not indexed by recipient (erasure then fails)."""
    records, groups, recipients = tracking_buckets(retention)
    opened: dict[str, KeyValue] = {}
    try:
        for spec in (records, groups):
            kv = await open_bucket(host, spec, policy)
            if kv is None:
                log.warning(
                    "KV bucket missing and KV_AUTO_CREATE=false: tracking is off",
                    extra={"bucket": spec.name},
                )
                return None
            opened[spec.name] = ReopeningBucket(host, spec, policy, kv)
    except StoreError as exc:
        log.warning("JetStream not available: tracking is off", extra={"error": str(exc)})
        return None
    by_recipient = await open_reopening_bucket(host, recipients, policy)
    log.info("tracking on", extra={"buckets": sorted(opened)})
    return TrackingStore(
        opened[records.name],
        opened[groups.name],
        recipients=by_recipient,
        expiring=retention > 0,
    )


async def open_reopening_bucket(
    host: BucketHost, spec: BucketSpec, policy: BucketPolicy
) -> ReopeningBucket | None:
    """One more bucket of the relay's (idempotency, suppressions), opened or
    created like the tracking buckets and re-opened when it vanishes.
    ``None`` when it is missing (``KV_AUTO_CREATE=false``) or JetStream is
    not available; the caller says what that turns off."""
    try:
        kv = await open_bucket(host, spec, policy)
    except StoreError as exc:
        log.warning("JetStream not available", extra={"bucket": spec.name, "error": str(exc)})
        return None
    if kv is None:
        log.warning("KV bucket missing and KV_AUTO_CREATE=false", extra={"bucket": spec.name})
        return None
    return ReopeningBucket(host, spec, policy, kv)
