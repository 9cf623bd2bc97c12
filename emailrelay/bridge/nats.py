"""nats-py, usable from trio: connection, request subscriptions, JetStream KV."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors
import nats.js.errors
import trio_asyncio
from anyio.streams.memory import MemoryObjectSendStream
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as _NatsSubscription
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue as _NatsKeyValue

from emailrelay.store.kv import BucketMissing, Entry, RevisionConflict, StoreError

log = logging.getLogger(__name__)

aio = trio_asyncio.aio_as_trio


DRAIN_TIMEOUT = 5
"""Seconds nats-py may take to drain the whole connection at shutdown."""


class NatsUnavailable(Exception):
    """No NATS server could be reached before the connect deadline."""


@dataclass(eq=False)
class IncomingRequest:
    """One request/reply message, handed from nats-py's callback to trio."""

    subject: str
    data: bytes
    headers: Mapping[str, str]
    reply: str
    _connection: NatsConnection = field(repr=False)

    async def respond(self, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        if not self.reply:
            return
        await self._connection.publish(self.reply, data, headers)


class RequestSubscription:
    """A queue subscription whose messages arrive on a trio channel."""

    def __init__(self, subscription: _NatsSubscription) -> None:
        self._subscription = subscription

    async def drain(self) -> None:
        """Stop taking new messages; deliver the ones already buffered first.

        Shielded from cancellation: a drain ends with a PING/PONG flush, and
        nats-py leaves a cancelled flush's future in its PONG queue, where the
        next PONG fails the connection's read loop (InvalidStateError). nats-py
        bounds the flush itself."""
        with anyio.CancelScope(shield=True):
            try:
                await aio(self._subscription.drain)()
            except nats.errors.Error as exc:
                log.warning("draining a subscription failed", extra={"error": repr(exc)})


@dataclass
class _Closing:
    """Set before a deliberate close, so the disconnect that follows is not a warning."""

    requested: bool = False


class NatsConnection:
    def __init__(self, client: Client, closing: _Closing | None = None) -> None:
        self._client = client
        self._closing = closing or _Closing()

    @classmethod
    async def connect(
        cls,
        servers: Sequence[str],
        creds: Path | None,
        give_up_after: float,
        name: str = "emailrelay",
    ) -> NatsConnection:
        """Connect, retrying for ``give_up_after`` seconds; once connected the
        client reconnects after any loss, indefinitely."""

        async def on_error(exc: Exception) -> None:
            log.warning("nats: %s", exc.__class__.__name__, extra={"error": str(exc)})

        closing = _Closing()

        async def on_disconnected() -> None:
            if closing.requested:
                log.info("nats: disconnected")
            else:
                log.warning("nats: disconnected; reconnecting")

        async def on_reconnected() -> None:
            log.info("nats: reconnected")

        options: dict[str, Any] = {
            "servers": list(servers),
            "name": name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,  # also retries the first connect
            "reconnect_time_wait": 1,
            "connect_timeout": 2,
            "drain_timeout": DRAIN_TIMEOUT,
            "error_cb": on_error,
            "disconnected_cb": on_disconnected,
            "reconnected_cb": on_reconnected,
        }
        if creds is not None:
            options["user_credentials"] = str(creds)
        client: Client | None = None
        with anyio.move_on_after(give_up_after):
            client = await aio(nats.connect)(**options)
        if client is None:
            raise NatsUnavailable(f"no NATS server reachable at {', '.join(servers)}")
        return cls(client, closing)

    @property
    def is_connected(self) -> bool:
        return bool(self._client.is_connected)

    @property
    def max_payload(self) -> int:
        return int(self._client.max_payload)

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        await aio(self._client.publish)(subject, data, headers=dict(headers) if headers else None)

    async def subscribe_requests(
        self, subject: str, queue: str, channel: MemoryObjectSendStream[IncomingRequest]
    ) -> RequestSubscription:
        """Subscribe in ``queue`` and hand every message to ``channel``
        (``queue=""``: a plain subscription, as for ``$SRV`` discovery).

        nats-py runs one callback at a time per subscription, so the callback
        only hands over: without waiting when the channel has room, else by
        awaiting the trio side (backpressure: nats-py buffers meanwhile, and
        its pending limits are lifted so a burst waits rather than drops).
        """

        async def hand_over(msg: Msg) -> None:
            request = IncomingRequest(
                subject=msg.subject,
                data=msg.data,
                headers=dict(msg.headers or {}),
                reply=msg.reply,
                _connection=self,
            )
            try:
                channel.send_nowait(request)
            except anyio.WouldBlock:
                await trio_asyncio.trio_as_aio(channel.send)(request)

        subscription = await aio(self._client.subscribe)(
            subject,
            queue=queue,
            cb=hand_over,
            pending_msgs_limit=0,  # 0 = unbounded in nats-py
            pending_bytes_limit=0,
        )
        return RequestSubscription(subscription)

    async def key_value(self, bucket: str) -> JetStreamKeyValue | None:
        """The bucket, or ``None`` when it does not exist. Raises
        :class:`StoreError` when JetStream itself is not available."""
        try:
            kv = await aio(self._client.jetstream().key_value)(bucket)
        except nats.js.errors.BucketNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"JetStream unavailable: {exc!r}") from exc
        return JetStreamKeyValue(kv, self._client)

    async def create_key_value(
        self, bucket: str, max_value_size: int, replicas: int
    ) -> JetStreamKeyValue:
        config = KeyValueConfig(
            bucket=bucket,
            history=1,
            storage=StorageType.FILE,
            max_value_size=max_value_size,
            replicas=replicas,
            direct=True,  # as the Go client creates buckets; lets get_many read in batches
        )
        try:
            kv = await aio(self._client.jetstream().create_key_value)(config)
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"creating bucket {bucket} failed: {exc!r}") from exc
        return JetStreamKeyValue(kv, self._client)

    async def drain(self) -> None:
        """Flush what is pending and close; safe to call on a closed client."""
        if self._client.is_closed:
            return
        self._closing.requested = True
        try:
            await aio(self._client.drain)()
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("nats: drain failed; closing", extra={"error": repr(exc)})
            await aio(self._client.close)()


_KV_TIMEOUT = 5.0


_GET_MANY_CONCURRENCY = 32  # single gets in flight when batch gets are not available


class JetStreamKeyValue:
    """:class:`emailrelay.store.kv.KeyValue` over a nats-py KV bucket.

    Failures are classified here, once: a lost race is
    :class:`~emailrelay.store.kv.RevisionConflict`; a bucket JetStream says is
    gone is :class:`~emailrelay.store.kv.BucketMissing`; anything else is a
    plain :class:`~emailrelay.store.kv.StoreError`.
    """

    def __init__(self, kv: _NatsKeyValue, client: Client | None = None) -> None:
        self._kv = kv
        self._client = client

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, Entry]:
        """One JetStream batch direct get (``multi_last``, nats-server 2.11+,
        bucket with direct gets allowed); else single gets, concurrently."""
        if not keys:
            return {}
        if self._batch_get_available():
            assert self._client is not None
            # nats-py's KeyValue keeps its stream and subject prefix private.
            stream: str = self._kv._stream
            prefix: str = self._kv._pre
            try:
                with anyio.fail_after(_KV_TIMEOUT):
                    found = await aio(_direct_get_last)(
                        self._client, stream, [prefix + key for key in keys]
                    )
            except _BatchGetFailed as exc:
                if exc.status == _NO_RESPONDERS:
                    raise await self._classify("batch get", exc) from exc
                raise StoreError(f"batch get failed: {exc!r}") from exc
            except (nats.errors.Error, TimeoutError) as exc:
                raise StoreError(f"batch get failed: {exc!r}") from exc
            return {subject[len(prefix) :]: entry for subject, entry in found.items()}
        entries: dict[str, Entry] = {}
        limiter = anyio.CapacityLimiter(_GET_MANY_CONCURRENCY)

        async def get_one(key: str) -> None:
            async with limiter:
                entry = await self.get(key)
            if entry is not None:
                entries[key] = entry

        try:
            async with anyio.create_task_group() as tg:
                for key in keys:
                    tg.start_soon(get_one, key)
        except BaseExceptionGroup as group:
            # One StoreError for the batch, as the port promises; a missing
            # bucket wins, since re-opening it is what cures the others.
            store_errors, other = group.split(StoreError)
            if other is not None or store_errors is None:
                raise
            errors = list(_leaves(store_errors))
            missing = [e for e in errors if isinstance(e, BucketMissing)]
            raise (missing or errors)[0] from group
        return entries

    def _batch_get_available(self) -> bool:
        if self._client is None or not getattr(self._kv, "_direct", False):
            return False
        try:
            version = self._client.connected_server_version
            return (version.major, version.minor) >= (2, 11)
        except Exception:  # not connected right now: single gets report that properly
            return False

    async def get(self, key: str) -> Entry | None:
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                entry = await aio(self._kv.get)(key)
        except nats.js.errors.KeyNotFoundError as exc:  # also deleted and purged keys
            if _stream_is_missing(exc):
                raise BucketMissing(f"get failed: bucket {self._kv._name} does not exist") from exc
            return None
        except nats.errors.NoRespondersError as exc:  # a direct get nobody serves
            raise await self._classify("get", exc) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"get failed: {exc!r}") from exc
        return Entry(value=entry.value or b"", revision=int(entry.revision or 0))

    async def create(self, key: str, value: bytes) -> int:
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                return int(await aio(self._kv.create)(key, value))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise RevisionConflict(key) from exc
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as exc:
            raise await self._classify("create", exc) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"create failed: {exc!r}") from exc

    async def update(self, key: str, value: bytes, last: int) -> int:
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                return int(await aio(self._kv.update)(key, value, last=last))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise RevisionConflict(key) from exc
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as exc:
            raise await self._classify("update", exc) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"update failed: {exc!r}") from exc

    async def _classify(self, what: str, exc: Exception) -> StoreError:
        """Nobody served the bucket's subjects: the bucket may be gone, or
        JetStream may be unreachable for a moment (a leader election, a
        restart). Ask JetStream which; only its "stream not found" (or a
        stream re-created with other settings than this handle was opened
        with) makes :class:`BucketMissing`, everything else stays transient."""
        bucket: str = self._kv._name
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                info = await aio(self._kv._js.stream_info)(self._kv._stream)
        except nats.js.errors.NotFoundError as info_exc:
            if info_exc.err_code == _STREAM_NOT_FOUND:
                return BucketMissing(f"{what} failed: bucket {bucket} does not exist")
            return StoreError(f"{what} failed: {exc!r}")
        except (nats.errors.Error, TimeoutError):
            return StoreError(f"{what} failed: {exc!r}")
        if bool(info.config.allow_direct) != bool(getattr(self._kv, "_direct", False)):
            return BucketMissing(
                f"{what} failed: bucket {bucket} was re-created with other settings"
            )
        return StoreError(f"{what} failed: {exc!r}")


_STREAM_NOT_FOUND = 10059  # JetStream API error code
_NO_RESPONDERS = "503"


def _leaves(group: BaseExceptionGroup[StoreError]) -> Iterator[StoreError]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _stream_is_missing(exc: nats.js.errors.KeyNotFoundError) -> bool:
    """nats-py reports "stream not found" from a (non-direct) get as a missing
    key; it keeps the API error as the context. A missing bucket is a store
    failure, never "not found"."""
    cause = exc.__context__
    return isinstance(cause, nats.js.errors.APIError) and cause.err_code == _STREAM_NOT_FOUND


class _BatchGetFailed(nats.errors.Error):
    def __init__(self, status: str) -> None:
        super().__init__(f"batch get answered status {status}")
        self.status = status


async def _direct_get_last(client: Client, stream: str, subjects: list[str]) -> dict[str, Entry]:
    """The last message of each subject, from one ``$JS.API.DIRECT.GET`` batch
    request (ADR-31 ``multi_last``). Runs on the asyncio side: the replies
    arrive as separate messages, ended by a status 204 (or 404: none found)."""
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    found: dict[str, Entry] = {}

    async def on_reply(msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status:
            if not done.done():
                done.set_result(status)
            return
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            return
        subject = headers.get("Nats-Subject", "")
        found[subject] = Entry(value=msg.data, revision=int(headers.get("Nats-Sequence", "0")))

    inbox = client.new_inbox()
    subscription = await client.subscribe(
        inbox, cb=on_reply, pending_msgs_limit=0, pending_bytes_limit=0
    )
    try:
        request = {"multi_last": subjects, "batch": len(subjects)}
        await client.publish(
            f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
        )
        status = await done
    finally:
        await subscription.unsubscribe()
    if status not in ("204", "404"):
        raise _BatchGetFailed(status)
    return found
