"""nats-py, usable from trio: connection, request subscriptions, JetStream KV."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import nats
import nats.errors
import nats.js.errors
import trio_asyncio
from anyio.streams.memory import MemoryObjectSendStream
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as _NatsSubscription
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue as _NatsKeyValue

from emailrelay import api
from emailrelay.store.kv import (
    MAX_BATCH_KEYS,
    BucketMissing,
    Change,
    Changes,
    Derive,
    DerivePair,
    Entry,
    RevisionConflict,
    StoreError,
    every_entry,
    one_store_error,
    read_then_write_separately,
)

log = logging.getLogger(__name__)

aio = trio_asyncio.aio_as_trio

T = TypeVar("T")


DRAIN_TIMEOUT = 5
"""Seconds nats-py may take to drain the whole connection at shutdown."""

CONNECT_TIMEOUT = 1.0
"""Seconds one connection attempt may take (TCP, INFO, CONNECT/PONG). A
reachable nats-server answers in milliseconds, so a second is generous even on
a loaded host, and an unreachable one (a killed pod whose address now drops
packets) costs one second before the next server is tried, not nats-py's
default two."""

RECONNECT_TIME_WAIT = 0.5
"""Seconds before a server tried less than this long ago is tried again (when
every server in the list just failed). Half a second: a SIGTERM'd node's
neighbours take over at once, and a node restarting answers within a second
or two, so a reply buffered during the reconnect still beats a 10 s caller."""


MAX_KEY_LENGTH = 3584
"""Longest KV key this bridge passes to nats-py. A key travels in a subject
(the JetStream direct-get subject carries it whole), and a protocol line
longer than the server's ``max_control_line`` (4 KiB by default) makes
nats-server answer ``-ERR 'Maximum Control Line Exceeded'`` and drop the
connection; nats-py, like the Go client, treats any such server error as
final and closes the connection for good instead of reconnecting. The keys
emailrelay builds stay far below this (docs/contract.md); this is the last
guard, so that no caller-supplied string can cut a replica off NATS: 3.5 KiB
leaves 512 bytes of the default line for the verb, the subject prefix (the
longest is ``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.``), the reply inbox
and the sizes."""


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
    received_at: float = field(default_factory=time.monotonic)
    """When nats-py handed the message over, on the monotonic clock."""
    received_wall: float = field(default_factory=time.time)
    """The same instant as Unix time (to read a caller's deadline header)."""

    async def respond(self, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        if not self.reply:
            return
        await self._connection.publish(self.reply, data, headers)


Deliver = Callable[[IncomingRequest], None]
"""Takes a request from nats-py's callback; must not block (it runs on the
asyncio side, one message at a time per subscription)."""


class RequestSubscription:
    """A (queue) subscription whose messages go to a callback.

    It can be paused and resumed: while paused this process is not a member
    of the queue group, so nats-server routes the subject's requests to the
    other replicas (or, when none is left, callers get "no responders" at
    once instead of waiting out their timeout)."""

    def __init__(
        self,
        client: Client,
        subject: str,
        queue: str,
        callback: Callable[[Msg], Any],
        pending_msgs_limit: int,
    ) -> None:
        self._client = client
        self._subject = subject
        self._queue = queue
        self._callback = callback
        self._pending_msgs_limit = pending_msgs_limit
        self._subscription: _NatsSubscription | None = None

    @property
    def active(self) -> bool:
        return self._subscription is not None

    async def resume(self) -> None:
        """Subscribe (again); raises :class:`NatsClosed` on a closed connection."""
        if self._subscription is not None:
            return
        try:
            self._subscription = await aio(self._client.subscribe)(
                self._subject,
                queue=self._queue,
                cb=self._callback,
                pending_msgs_limit=self._pending_msgs_limit,
                pending_bytes_limit=0 if self._pending_msgs_limit == 0 else _PENDING_BYTES_LIMIT,
            )
        except nats.errors.ConnectionClosedError as exc:
            raise NatsClosed(str(exc)) from exc
        await _confirm_subscribed(self._client)

    async def pause(self) -> None:
        """Leave the subject; the messages already on their way are still
        delivered to the callback first (see :meth:`drain`)."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await _drain_subscription(self._client, subscription)

    async def drain(self) -> None:
        """Stop taking new messages; deliver the ones already buffered first."""
        await self.pause()


async def drain_all(subscriptions: Iterable[RequestSubscription]) -> None:
    """How a request loop stops taking requests: drain every subscription
    (:meth:`RequestSubscription.drain`) before closing the channel behind
    them, so that what nats-server already sent is still delivered and
    answered. Shared by :mod:`emailrelay.server` and :mod:`emailrelay.discovery`."""
    for subscription in subscriptions:
        await subscription.drain()


async def _confirm_subscribed(client: Client) -> None:
    """A PING/PONG round trip after a SUB: once it returns, nats-server has
    the subscription, so a request sent right after this relay says it serves
    reaches it instead of answering "no responders". Shielded and bounded as
    a drain's flush is (see :func:`_drain_subscription`); while disconnected
    there is nothing to confirm (the reconnect sends every SUB again)."""
    with anyio.CancelScope(shield=True):
        try:
            if client.is_connected:
                await aio(client.flush)(_SUBSCRIBE_CONFIRM_TIMEOUT)
        except (nats.errors.Error, OSError) as exc:
            log.warning("subscription not confirmed by the server", extra={"error": repr(exc)})


async def _drain_subscription(client: Client, subscription: _NatsSubscription) -> None:
    """Drain: UNSUB, a PING/PONG round trip so that everything the server sent
    before the UNSUB has arrived, then wait until the callback took it.

    Shielded from cancellation: nats-py leaves a cancelled flush's future in
    its PONG queue, where the next PONG fails the connection's read loop
    (InvalidStateError). nats-py bounds the flush itself. While disconnected
    nothing more can arrive and the flush could only time out, so then the
    subscription is just dropped (the server forgets it with the connection)."""
    with anyio.CancelScope(shield=True):
        try:
            if client.is_connected:
                await aio(subscription.drain)()
            elif not client.is_closed:
                await aio(subscription.unsubscribe)()
        except (nats.errors.Error, OSError) as exc:
            log.warning("draining a subscription failed", extra={"error": repr(exc)})


_PENDING_MSGS_LIMIT = 65536
_PENDING_BYTES_LIMIT = 64 * 1024 * 1024


class NatsClosed(Exception):
    """The NATS connection is closed for good: nats-py will not reconnect."""


@dataclass
class _Closing:
    """Set before a deliberate close, so the disconnect that follows is not a warning."""

    requested: bool = False


@dataclass
class _FirstConnect:
    """Failures before the first connect, counted instead of logged one by one."""

    done: bool = False
    failures: int = 0
    first_error: str = ""


class NatsConnection:
    def __init__(
        self,
        client: Client,
        closing: _Closing | None = None,
        closed: anyio.Event | None = None,
    ) -> None:
        self._client = client
        self._closing = closing or _Closing()
        self._closed = closed or anyio.Event()

    @classmethod
    async def connect(
        cls,
        servers: Sequence[str],
        creds: Path | None,
        give_up_after: float,
        name: str = "emailrelay",
    ) -> NatsConnection:
        """Connect, retrying for ``give_up_after`` seconds; once connected the
        client reconnects after any loss, indefinitely. Before the first
        connect only the first failure is logged (nats-py reports one a
        second); :class:`NatsUnavailable` counts them all."""
        first_connect = _FirstConnect()

        async def on_error(exc: Exception) -> None:
            if not first_connect.done:
                first_connect.failures += 1
                if first_connect.failures > 1:
                    return
                first_connect.first_error = f"{exc.__class__.__name__}: {exc}"
                log.warning(
                    "nats: cannot connect yet (%s); retrying, repeats not logged",
                    exc.__class__.__name__,
                    extra={"error": str(exc)},
                )
                return
            log.warning("nats: %s", exc.__class__.__name__, extra={"error": str(exc)})

        closing = _Closing()

        async def on_disconnected() -> None:
            if closing.requested:
                log.info("nats: disconnected")
            else:
                log.warning("nats: disconnected; reconnecting")

        async def on_reconnected() -> None:
            log.info("nats: reconnected")

        # Set from the asyncio side: trio-asyncio runs its callbacks inside
        # trio, so a trio event may be set there.
        closed = anyio.Event()

        async def on_closed() -> None:
            closed.set()

        options: dict[str, Any] = {
            "servers": list(servers),
            "name": name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,  # also retries the first connect
            # Part of a reply's time budget (docs/deployment.md, "Tracking
            # through outages"): a reply published while disconnected waits in
            # nats-py's buffer until the reconnect. The next server in the
            # list is tried at once; these bound a server that does not answer.
            "reconnect_time_wait": RECONNECT_TIME_WAIT,
            "connect_timeout": CONNECT_TIMEOUT,
            "drain_timeout": DRAIN_TIMEOUT,
            "error_cb": on_error,
            "disconnected_cb": on_disconnected,
            "reconnected_cb": on_reconnected,
            "closed_cb": on_closed,
        }
        if creds is not None:
            options["user_credentials"] = str(creds)
        client: Client | None = None
        with anyio.move_on_after(give_up_after):
            client = await aio(nats.connect)(**options)
        if client is None:
            raise NatsUnavailable(
                f"no NATS server reachable at {', '.join(servers)} "
                f"({first_connect.failures} failed attempts; the first: "
                f"{first_connect.first_error or 'no answer'})"
            )
        first_connect.done = True
        return cls(client, closing, closed)

    @property
    def is_connected(self) -> bool:
        return bool(self._client.is_connected)

    async def wait_closed_for_good(self) -> str:
        """Return once the connection is closed and nats-py will not reconnect,
        unless this process closed it (:meth:`drain`); the reason.

        Reconnecting covers a lost connection, but nats-py (like the Go
        client) closes for good on any protocol error the server reports
        (``-ERR``, such as ``maximum control line exceeded``): a relay in that
        state can never serve again, so it has to stop and be restarted."""
        while not self._client.is_closed:
            # nats-py skips its closed callback on some paths: look again each second.
            with anyio.move_on_after(1):
                await self._closed.wait()
        if self._closing.requested:
            await anyio.sleep_forever()
        return repr(self._client.last_error)

    @property
    def max_payload(self) -> int:
        return int(self._client.max_payload)

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        await aio(self._client.publish)(subject, data, headers=dict(headers) if headers else None)

    async def gather_replies(self, subject: str, wait: float) -> list[bytes]:
        """Every reply to one empty request that arrives within ``wait``
        seconds (``$SRV.INFO.emailrelay``: one per running instance)."""
        inbox = self._client.new_inbox()
        replies_in, replies_out = anyio.create_memory_object_stream[IncomingRequest](math.inf)
        subscription = await self.subscribe_requests(inbox, "", replies_in)
        replies: list[bytes] = []
        try:
            await aio(self._client.publish)(subject, b"", reply=inbox)
            with anyio.move_on_after(wait):
                async for reply in replies_out:
                    replies.append(reply.data)
        finally:
            await subscription.drain()
        return replies

    async def subscribe_requests(
        self, subject: str, queue: str, channel: MemoryObjectSendStream[IncomingRequest]
    ) -> RequestSubscription:
        """Subscribe in ``queue`` and hand every message to ``channel``
        (``queue=""``: a plain subscription, as for ``$SRV`` discovery).

        nats-py runs one callback at a time per subscription, so the callback
        only hands over: without waiting when the channel has room, else by
        awaiting the trio side (backpressure: nats-py buffers meanwhile, its
        pending limits lifted: discovery requests are few and small).
        """

        async def hand_over(msg: Msg) -> None:
            request = self._incoming(msg)
            try:
                channel.send_nowait(request)
            except anyio.WouldBlock:
                await trio_asyncio.trio_as_aio(channel.send)(request)

        subscription = RequestSubscription(self._client, subject, queue, hand_over, 0)
        await subscription.resume()
        return subscription

    async def queue_subscribe(
        self, subject: str, queue: str, deliver: Deliver
    ) -> RequestSubscription:
        """Subscribe in ``queue``; ``deliver`` takes every message at once.

        ``deliver`` never blocks, so nats-py's own buffer holds at most what
        one socket read brought in; its limits (:data:`_PENDING_MSGS_LIMIT`,
        64 MiB) are a backstop, not the backlog bound (that is the caller's,
        see emailrelay.server). Were they ever reached, nats-py would drop the
        excess (a slow-consumer error): such a request never reaches a
        handler, so it is never sent; its caller times out.
        """

        async def hand_over(msg: Msg) -> None:
            deliver(self._incoming(msg))

        subscription = RequestSubscription(
            self._client, subject, queue, hand_over, _PENDING_MSGS_LIMIT
        )
        await subscription.resume()
        return subscription

    def _incoming(self, msg: Msg) -> IncomingRequest:
        return IncomingRequest(
            subject=msg.subject,
            data=msg.data,
            headers=dict(msg.headers or {}),
            reply=msg.reply,
            _connection=self,
        )

    async def key_value(self, bucket: str) -> JetStreamKeyValue | None:
        """The bucket, or ``None`` when it does not exist. Raises
        :class:`StoreError` when JetStream itself is not available."""
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                kv = await aio(self._jetstream().key_value)(bucket)
        except nats.js.errors.BucketNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"JetStream unavailable: {exc!r}") from exc
        return JetStreamKeyValue(kv, self._client)

    async def create_key_value(
        self, bucket: str, max_value_size: int, replicas: int, max_age: float = 0.0
    ) -> JetStreamKeyValue:
        config = KeyValueConfig(
            bucket=bucket,
            history=1,
            storage=StorageType.FILE,
            max_value_size=max_value_size,
            replicas=replicas,
            ttl=max_age or None,  # nats-py's name for the stream's max_age (seconds)
            direct=True,  # as the Go client creates buckets; lets get_many read in batches
        )
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                kv = await aio(self._jetstream().create_key_value)(config)
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"creating bucket {bucket} failed: {exc!r}") from exc
        return JetStreamKeyValue(kv, self._client)

    async def stream_exists(self, name: str) -> bool:
        """Whether the JetStream stream ``name`` exists; :class:`StoreError`
        when JetStream cannot say."""
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                await aio(self._jetstream().stream_info)(name)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                return False
            raise StoreError(f"stream info failed: {exc!r}") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"JetStream unavailable: {exc!r}") from exc
        return True

    async def create_stream(self, spec: StreamSpec) -> None:
        """Create the stream (file storage, discard old); :class:`StoreError`
        when that fails (another replica's create racing this one included:
        the caller looks again)."""
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            storage=StorageType.FILE,
            num_replicas=spec.replicas,
            max_age=spec.max_age,  # seconds; nats-py sends nanoseconds
            max_bytes=spec.max_bytes,
            discard=DiscardPolicy.OLD,
            duplicate_window=spec.duplicate_window,
        )
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                await aio(self._jetstream().add_stream)(config)
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"creating stream {spec.name} failed: {exc!r}") from exc

    async def publish_to_stream(self, subject: str, data: bytes, msg_id: str) -> bool:
        """Publish to JetStream with ``Nats-Msg-Id: msg_id`` and wait for the
        stream's acknowledgement (5 s at most; a caller may bound it tighter);
        ``True`` when the stream dropped it as a copy of a message it already
        holds (same id within its duplicate window). :class:`NoStreamAnswered`
        when nobody answered, :class:`StoreError` for any other failure (no
        acknowledgement in time, a JetStream error): the caller keeps the
        event to publish again (a message that did land then arrives as a
        duplicate and is dropped)."""
        headers = {api.MSG_ID_HEADER: msg_id}
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                ack = await aio(self._jetstream().publish)(subject, data, headers=headers)
        except nats.js.errors.NoStreamResponseError as exc:
            raise NoStreamAnswered(f"publish to {subject}: no stream answered") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"publish to {subject} failed: {exc!r}") from exc
        return bool(ack.duplicate)

    def _jetstream(self) -> JetStreamContext:
        # timeout=None: no per-request timer in nats-py; every call through
        # this context is bounded by a trio-side scope (_KV_TIMEOUT) instead.
        return self._client.jetstream(timeout=None)

    async def drain(self) -> None:
        """Flush what is pending and close; safe to call on a closed client.

        Never raises: it runs on the way out, whatever state NATS is in. While
        disconnected there is nothing to drain into, so the client is just
        closed (and closing a dead transport may fail: that is no news)."""
        if self._client.is_closed:
            return
        self._closing.requested = True
        if self._client.is_connected:
            try:
                await aio(self._client.drain)()
                return
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                log.warning("nats: drain failed; closing", extra={"error": repr(exc)})
        try:
            await aio(self._client.close)()
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            log.info("nats: closed", extra={"error": repr(exc)})


class NoStreamAnswered(StoreError):
    """A JetStream publish nobody answered: no stream holds the subject (it
    was deleted, or never made), or JetStream is away for a moment."""


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream as the relay creates it (file storage, discard old)."""

    name: str
    subjects: tuple[str, ...]
    replicas: int
    max_age: float
    """Seconds a message is kept."""
    max_bytes: int
    duplicate_window: float
    """Seconds within which a second message with the same ``Nats-Msg-Id`` is dropped."""


_SUBSCRIBE_CONFIRM_TIMEOUT = 2.0
"""Seconds to wait for the server to confirm a new subscription (a PONG)."""

_KV_TIMEOUT = 5.0
"""Seconds any one KV call may take, enforced on the trio side around each
crossing. nats-py's own request timeouts are off (:meth:`NatsConnection._jetstream`):
each would cost a timer and a waiter on the trio-asyncio loop, per round trip,
to bound what the trio side already bounds."""


_GET_MANY_CONCURRENCY = 32  # single gets in flight when batch gets are not available


@asynccontextmanager
async def drained_on_exit(nats: NatsConnection) -> AsyncIterator[NatsConnection]:
    try:
        yield nats
    finally:
        # nats-py bounds the drain (DRAIN_TIMEOUT) and then closes; cancelling
        # it from outside would leave asyncio tasks failing inside the loop.
        with anyio.CancelScope(shield=True):
            await nats.drain()


@asynccontextmanager
async def connected_to_nats(
    servers: Sequence[str], creds: Path | None, give_up_after: float
) -> AsyncIterator[NatsConnection]:
    """The NATS connection, drained on the way out (inside
    :func:`emailrelay.bridge.loop.asyncio_loop`)."""
    nats = await NatsConnection.connect(servers, creds, give_up_after=give_up_after)
    async with drained_on_exit(nats):
        yield nats


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
        self._bucket = _BucketInternals.of(kv)

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, Entry]:
        """One JetStream batch direct get (``multi_last``, nats-server 2.11+,
        bucket with direct gets allowed); else single gets, concurrently."""
        if not keys:
            return {}
        if self._batch_get_available():
            assert self._client is not None
            stream, prefix = self._bucket.stream, self._bucket.prefix
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
            # One StoreError for the batch, as the port promises.
            raise one_store_error(group) from group
        return entries

    def _batch_get_available(self) -> bool:
        if self._client is None or not self._bucket.direct:
            return False
        try:
            version = self._client.connected_server_version
            return (version.major, version.minor) >= (2, 11)
        except Exception:  # not connected right now: single gets report that properly
            return False

    async def get(self, key: str) -> Entry | None:
        if len(key) > MAX_KEY_LENGTH:
            return None  # never written (see create/update), so not there
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                entry = await aio(self._kv.get)(key)
        except nats.js.errors.KeyNotFoundError as exc:  # also deleted and purged keys
            if _stream_is_missing(exc):
                raise BucketMissing(
                    f"get failed: bucket {self._bucket.name} does not exist"
                ) from exc
            return None
        except nats.errors.NoRespondersError as exc:  # a direct get nobody serves
            raise await self._classify("get", exc) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"get failed: {exc!r}") from exc
        return Entry(value=entry.value or b"", revision=int(entry.revision or 0))

    async def keys(self) -> list[str]:
        """Every key that holds a value (deleted and purged keys left out)."""
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                return list(await aio(self._kv.keys)())
        except nats.js.errors.NoKeysError:
            return []
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"listing keys failed: {exc!r}") from exc

    async def changes(self, after: int) -> Changes:
        """The next writes after revision ``after``, at most 1,000
        (:class:`~emailrelay.store.kv.FollowableKeyValue`): one stream info
        (the bucket's incarnation and last revision), then one batch direct
        get of the stream from ``after + 1`` (``next_by_subj``, nats-server
        2.11+). Without batch gets: the whole bucket (``complete``)."""
        if not self._batch_get_available():
            return await every_entry(self)
        assert self._client is not None
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                info = await aio(self._bucket.js.stream_info)(self._bucket.stream)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                raise BucketMissing(f"bucket {self._bucket.name} does not exist") from exc
            raise StoreError(f"stream info failed: {exc!r}") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"stream info failed: {exc!r}") from exc
        epoch, last = str(info.created), int(info.state.last_seq or 0)
        if after >= last:
            return Changes(epoch, after, [])
        prefix = self._bucket.prefix
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                batch, pending = await aio(_direct_get_range)(
                    self._client, self._bucket.stream, prefix + ">", after + 1, MAX_BATCH_KEYS
                )
        except (_BatchGetFailed, nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"reading changes failed: {exc!r}") from exc
        changes = [Change(subject[len(prefix) :], entry) for subject, _, entry in batch]
        revision = max((sequence for _, sequence, _ in batch), default=last)
        return Changes(epoch, revision, changes, more=pending > 0)

    async def create(self, key: str, value: bytes) -> int:
        return await self._write("create", key, partial(self._kv.create, key, value))

    async def update(self, key: str, value: bytes, last: int) -> int:
        return await self._write("update", key, partial(self._kv.update, key, value, last=last))

    async def max_age(self) -> float:
        """The bucket's ``max_age`` in seconds (0: for ever)."""
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                info = await aio(self._bucket.js.stream_info)(self._bucket.stream)
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"stream info failed: {exc!r}") from exc
        return float(info.config.max_age or 0.0)

    async def scan(self) -> AsyncIterator[tuple[str, Entry]]:
        """Every key that holds a value, with its value, streamed (an ordered
        consumer over the bucket: memory stays bounded whatever its size)."""
        watcher = await aio(self._kv.watchall)(ignore_deletes=True)
        try:
            while True:
                with anyio.fail_after(_KV_TIMEOUT):
                    update = await aio(watcher.updates)(timeout=_KV_TIMEOUT)
                if update is None:
                    return
                if update.value:
                    yield update.key, Entry(update.value, int(update.revision or 0))
        finally:
            with anyio.CancelScope(shield=True):
                await aio(watcher.stop)()

    async def count(self) -> int:
        """How many messages the bucket's stream holds (a progress total)."""
        with anyio.fail_after(_KV_TIMEOUT):
            info = await aio(self._bucket.js.stream_info)(self._bucket.stream)
        return int(info.state.messages)

    async def purge(self, key: str, last: int | None = None) -> None:
        """A purge marker with a subject rollup: every earlier revision of
        the key is removed from the stream, not just hidden."""
        headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
        if last is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
        subject = self._bucket.prefix + key
        await self._write("purge", key, partial(_publish_seq, self._bucket.js, subject, headers))

    async def _write(self, what: str, key: str, write: Callable[[], Awaitable[int]]) -> int:
        """One revision-checked write (``write`` calls nats-py), its failures classified."""
        _check_key_length(key)
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                return int(await aio(write)())
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise RevisionConflict(key) from exc
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as exc:
            raise await self._classify(what, exc) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"{what} failed: {exc!r}") from exc

    async def read_then_write(self, key: str, derive: Derive[T]) -> tuple[T, int | None]:
        """A get and the create/update ``derive`` asks for, in one crossing
        into the asyncio loop (see :func:`emailrelay.store.kv.read_then_write`).
        ``derive`` runs on the asyncio side, between the two round trips."""
        if len(key) > MAX_KEY_LENGTH:
            return await read_then_write_separately(self, key, derive)
        return await self._in_one_crossing(key, partial(_read_then_write, self._kv, key, derive))

    async def read_pair_then_write(
        self, key: str, other: str, derive: DerivePair[T]
    ) -> tuple[T, int | None]:
        """:meth:`read_then_write` whose ``derive`` also sees ``other``: both
        gets go out at once, in the same crossing."""
        if len(key) > MAX_KEY_LENGTH or len(other) > MAX_KEY_LENGTH:
            seen = await self.get(other)
            return await read_then_write_separately(self, key, lambda e: derive(e, seen))
        return await self._in_one_crossing(
            key, partial(_read_pair_then_write, self._kv, key, other, derive)
        )

    async def _in_one_crossing(
        self, key: str, call: Callable[[], Awaitable[tuple[T, int | None]]]
    ) -> tuple[T, int | None]:
        """Run a read-then-write ``call`` on the asyncio side, its failures classified."""
        try:
            with anyio.fail_after(2 * _KV_TIMEOUT):
                result: tuple[T, int | None] = await aio(call)()
                return result
        except _StreamMissing as exc:
            raise BucketMissing(
                f"get failed: bucket {self._bucket.name} does not exist"
            ) from exc.__cause__
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise RevisionConflict(key) from exc
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as exc:
            raise await self._classify("read then write", exc) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"read then write failed: {exc!r}") from exc

    async def _classify(self, what: str, exc: Exception) -> StoreError:
        """Nobody served the bucket's subjects: the bucket may be gone, or
        JetStream may be unreachable for a moment (a leader election, a
        restart). Ask JetStream which; only its "stream not found" (or a
        stream re-created with other settings than this handle was opened
        with) makes :class:`BucketMissing`, everything else stays transient."""
        bucket = self._bucket.name
        try:
            with anyio.fail_after(_KV_TIMEOUT):
                info = await aio(self._bucket.js.stream_info)(self._bucket.stream)
        except nats.js.errors.NotFoundError as info_exc:
            if info_exc.err_code == _STREAM_NOT_FOUND:
                return BucketMissing(f"{what} failed: bucket {bucket} does not exist")
            return StoreError(f"{what} failed: {exc!r}")
        except (nats.errors.Error, TimeoutError):
            return StoreError(f"{what} failed: {exc!r}")
        if bool(info.config.allow_direct) != self._bucket.direct:
            return BucketMissing(
                f"{what} failed: bucket {bucket} was re-created with other settings"
            )
        return StoreError(f"{what} failed: {exc!r}")


@dataclass(frozen=True)
class _BucketInternals:
    """What nats-py's ``KeyValue`` knows about its bucket but keeps private
    (nats-py 2.x): the bucket and stream names, the subject prefix of its
    keys, whether direct gets are allowed, and its JetStream context. The
    batch get and the "is the bucket gone?" question need them; this is the
    one place that reads nats-py's private fields, so a nats-py upgrade that
    renames them breaks here, at open, and nowhere else."""

    name: str
    stream: str
    prefix: str
    direct: bool
    js: Any

    @classmethod
    def of(cls, kv: _NatsKeyValue) -> _BucketInternals:
        return cls(
            name=kv._name,
            stream=kv._stream,
            prefix=kv._pre,
            direct=bool(getattr(kv, "_direct", False)),
            js=kv._js,
        )


class _StreamMissing(Exception):
    """A get found the bucket's stream gone (raised on the asyncio side)."""


async def _read_then_write(kv: _NatsKeyValue, key: str, derive: Derive[T]) -> tuple[T, int | None]:
    """Runs on the asyncio side: get, ``derive``, then create or update."""
    entry = await _get_entry(kv, key)
    return await _write_derived(kv, key, entry, derive(entry))


async def _read_pair_then_write(
    kv: _NatsKeyValue, key: str, other: str, derive: DerivePair[T]
) -> tuple[T, int | None]:
    """Runs on the asyncio side: both gets at once, ``derive``, then the write."""
    entry, seen = await asyncio.gather(_get_entry(kv, key), _get_entry(kv, other))
    return await _write_derived(kv, key, entry, derive(entry, seen))


async def _get_entry(kv: _NatsKeyValue, key: str) -> Entry | None:
    try:
        found = await kv.get(key)
    except nats.js.errors.KeyNotFoundError as exc:  # also deleted and purged keys
        if _stream_is_missing(exc):
            raise _StreamMissing() from exc
        return None
    return Entry(value=found.value or b"", revision=int(found.revision or 0))


async def _write_derived(
    kv: _NatsKeyValue, key: str, entry: Entry | None, derived: tuple[bytes | None, T]
) -> tuple[T, int | None]:
    value, result = derived
    if value is None:
        return result, None
    if entry is None:
        return result, int(await kv.create(key, value))
    return result, int(await kv.update(key, value, last=entry.revision))


async def _publish_seq(js: Any, subject: str, headers: dict[str, str]) -> int:
    """Publish to the bucket's stream; a wrong expected revision is a lost
    race, as nats-py's own ``update`` reports it."""
    try:
        ack = await js.publish(subject, b"", headers=headers)
    except nats.js.errors.APIError as exc:
        if exc.err_code in (10071, 10164):
            raise nats.js.errors.KeyWrongLastSequenceError(description=exc.description) from exc
        raise
    return int(ack.seq)


def _check_key_length(key: str) -> None:
    if len(key) > MAX_KEY_LENGTH:
        raise StoreError(f"key of {len(key)} characters is longer than {MAX_KEY_LENGTH}")


_STREAM_NOT_FOUND = 10059  # JetStream API error code
_NO_RESPONDERS = "503"


def _stream_is_missing(exc: nats.js.errors.KeyNotFoundError) -> bool:
    """nats-py reports "stream not found" from a (non-direct) get as a missing
    key; it keeps the API error as the context. A missing bucket is a store
    failure, never "not found"."""
    cause = exc.__context__
    # A purged or deleted key's KeyDeletedError is an APIError without an err_code.
    return (
        isinstance(cause, nats.js.errors.APIError)
        and getattr(cause, "err_code", None) == _STREAM_NOT_FOUND
    )


@dataclass(frozen=True)
class BatchEnd:
    """The last message of a batch direct get: ``204`` (all sent), ``404``
    (none of the subjects has a message), anything else a failure."""

    status: str


def decode_batch_get_reply(
    headers: Mapping[str, str] | None, data: bytes
) -> tuple[str, Entry] | BatchEnd | None:
    """One message of a ``multi_last`` batch direct-get reply (ADR-31): a
    subject's last entry, the end of the batch, or ``None`` for a key whose
    last operation deleted or purged it (absent, as a single get says)."""
    headers = headers or {}
    status = headers.get("Status")
    if status:
        return BatchEnd(status)
    if headers.get("KV-Operation") in ("DEL", "PURGE"):
        return None
    subject = headers.get("Nats-Subject", "")
    return subject, Entry(value=data, revision=int(headers.get("Nats-Sequence", "0")))


async def _direct_get_range(
    client: Client, stream: str, subjects: str, start: int, batch: int
) -> tuple[list[tuple[str, int, Entry | None]], int]:
    """Up to ``batch`` messages of ``stream`` on ``subjects`` from sequence
    ``start`` on, in order, as ``(subject, sequence, entry)`` (``None``: a
    delete or purge marker), from one batch direct get (ADR-31
    ``next_by_subj``); and how many more there are after them."""
    done: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    found: list[tuple[str, int, Entry | None]] = []

    async def on_reply(msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status:
            if not done.done():
                done.set_result((status, int(headers.get("Nats-Num-Pending", "0") or 0)))
            return
        found.append(_range_part(headers, msg.data))

    inbox = client.new_inbox()
    subscription = await client.subscribe(
        inbox, cb=on_reply, pending_msgs_limit=0, pending_bytes_limit=0
    )
    try:
        request = {"seq": start, "next_by_subj": subjects, "batch": batch}
        await client.publish(
            f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
        )
        status, pending = await done
    finally:
        await subscription.unsubscribe()
    if status == "404":
        return [], 0
    if status != "204":
        raise _BatchGetFailed(status)
    return found, pending


def _range_part(headers: Mapping[str, str], data: bytes) -> tuple[str, int, Entry | None]:
    sequence = int(headers.get("Nats-Sequence", "0"))
    deleted = headers.get("KV-Operation") in ("DEL", "PURGE")
    entry = None if deleted else Entry(value=data, revision=sequence)
    return headers.get("Nats-Subject", ""), sequence, entry


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
        part = decode_batch_get_reply(msg.headers, msg.data)
        if isinstance(part, BatchEnd):
            if not done.done():
                done.set_result(part.status)
        elif part is not None:
            subject, entry = part
            found[subject] = entry

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
