"""A synchronous NATS client for plain (non-async) tests.

``SyncNats`` runs a nats-py client on an asyncio event loop in a background
thread; each method submits a coroutine to that loop and blocks for its
result. Tests read like scripts, and many requests can still run concurrently
(``request_many``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError

from emailrelay.bridge.loop import AsyncioCalls, separate_asyncio_loop

T = TypeVar("T")

Payload = bytes | dict[str, Any] | list[Any] | str


def encode_payload(payload: Payload) -> bytes:
    """bytes as they are, str as UTF-8, dict and list as JSON."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(payload).encode()


async def _ignore_error(exc: Exception) -> None:
    """nats-py logs connection errors by default; reconnecting is expected in these tests."""


class SyncNats:
    """A nats-py connection driven from synchronous code.

    Reconnects forever (``allow_reconnect``, ``max_reconnect_attempts=-1``) with
    a short wait, so it survives ``NatsServer.restart()``.
    """

    def __init__(
        self,
        url: str | list[str],
        *,
        connect_timeout: float = 10.0,
        reconnect_time_wait: float = 0.1,
        name: str = "emailrelay-tests",
    ) -> None:
        self.url = url  # one server, or a cluster's (nats-py tries them in turn)
        self._loop = separate_asyncio_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="sync-nats-loop", daemon=True
        )
        self._thread.start()
        self._nc: Client | None = None
        try:
            self._nc = self.run(
                nats.connect(
                    url,
                    name=name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=reconnect_time_wait,
                    connect_timeout=connect_timeout,
                    error_cb=_ignore_error,
                ),
                timeout=connect_timeout + 5,
            )
        except BaseException:
            self._stop_loop()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run ``coro`` on this client's loop and wait for its result; for what
        the other methods do not cover (``nc`` and ``js`` calls, headers)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError("SyncNats is closed")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    # request/reply

    def request(
        self,
        subject: str,
        payload: Payload,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        """Send one request and return the raw reply body."""

        async def go() -> bytes:
            msg = await self.nc.request(
                subject, encode_payload(payload), timeout=timeout, headers=headers
            )
            return msg.data

        return self.run(go(), timeout=timeout + 5)

    def request_json(
        self,
        subject: str,
        payload: Payload,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Send one request and return the JSON-decoded reply."""
        return json.loads(self.request(subject, payload, timeout=timeout, headers=headers))

    def request_many(
        self,
        subject: str,
        payloads: Sequence[Payload],
        concurrency: int = 64,
        timeout: float = 30.0,
    ) -> list[Any]:
        """Send all requests, at most ``concurrency`` in flight; JSON replies in payload order.

        ``timeout`` bounds the whole batch and each single request.
        """

        async def go() -> list[Any]:
            limit = asyncio.Semaphore(concurrency)

            async def one(payload: Payload) -> Any:
                async with limit:
                    msg = await self.nc.request(subject, encode_payload(payload), timeout=timeout)
                return json.loads(msg.data)

            return await asyncio.gather(*(one(p) for p in payloads))

        return self.run(asyncio.wait_for(go(), timeout), timeout=timeout + 5)

    def publish(self, subject: str, payload: Payload) -> None:
        async def go() -> None:
            await self.nc.publish(subject, encode_payload(payload))
            await self.nc.flush()

        self.run(go())

    @contextlib.contextmanager
    def responder(
        self, subject: str, handler: Callable[[bytes], Payload], queue: str = ""
    ) -> Iterator[None]:
        """Answer requests on ``subject`` with ``handler(request body)`` while the block runs."""

        async def on_message(msg: Msg) -> None:
            await msg.respond(encode_payload(handler(msg.data)))

        async def subscribe() -> Any:
            sub = await self.nc.subscribe(subject, queue=queue, cb=on_message)
            await self.nc.flush()
            return sub

        sub = self.run(subscribe())
        try:
            yield
        finally:
            self.run(sub.unsubscribe())

    # JetStream KV

    def create_bucket(
        self,
        name: str,
        history: int = 1,
        max_value_size: int = 1024 * 1024,
        storage: StorageType = StorageType.FILE,
        direct: bool = False,
    ) -> None:
        config = KeyValueConfig(
            bucket=name,
            history=history,
            max_value_size=max_value_size,
            storage=storage,
            direct=direct,
        )

        async def go() -> None:
            await self.js.create_key_value(config=config)

        self.run(go())

    def delete_bucket(self, name: str) -> None:
        async def go() -> None:
            await self.js.delete_key_value(name)

        self.run(go())

    def kv_get(self, bucket: str, key: str) -> bytes | None:
        """The value stored under ``key``, or None when the key does not exist (or was deleted)."""

        async def go() -> bytes | None:
            kv = await self.js.key_value(bucket)
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                return None
            return entry.value

        return self.run(go())

    def kv_put(self, bucket: str, key: str, value: Payload) -> int:
        """Store ``value`` under ``key``; returns the new revision."""

        async def go() -> int:
            kv = await self.js.key_value(bucket)
            return await kv.put(key, encode_payload(value))

        return self.run(go())

    # lifetime

    def close(self) -> None:
        """Close the connection, stop the loop and join its thread. Idempotent."""
        if self._nc is not None:
            nc, self._nc = self._nc, None
            with contextlib.suppress(Exception):
                self.run(nc.close(), timeout=10.0)
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return

        async def cancel_leftovers() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_leftovers(), timeout=10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.asynccontextmanager
async def silent_subscriber(url: str, subject: str) -> AsyncIterator[None]:
    """A plain nats-py subscriber on ``subject`` that never answers (under trio)."""
    calls = AsyncioCalls()
    await calls.open()
    try:
        nc = await calls(nats.connect, url)
        try:
            await calls(nc.subscribe, subject)
            await calls(nc.flush)
            yield
        finally:
            await calls(nc.close)
    finally:
        await calls.close()
