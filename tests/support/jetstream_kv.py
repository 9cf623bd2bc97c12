"""In-process JetStream KV for end-to-end tests of the stores: real
nats-server buckets behind the relay's own adapter (emailrelay.bridge.nats),
from trio code, as the relay uses them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio_asyncio
from nats.js.api import KeyValueConfig, StorageType

from emailrelay.bridge.nats import JetStreamKeyValue, NatsConnection
from emailrelay.store.buckets import BucketSpec


@asynccontextmanager
async def replicas_on_one_bucket(
    url: str, spec: BucketSpec, count: int = 2
) -> AsyncIterator[list[JetStreamKeyValue]]:
    """``count`` NATS connections (as ``count`` replicas would hold), each
    with its own handle on a fresh bucket of ``spec``'s settings (a unique
    name, so tests do not share data)."""
    name = f"{spec.name}-{uuid.uuid4().hex[:8]}"
    async with trio_asyncio.open_loop():
        connections = [
            await NatsConnection.connect([url], None, give_up_after=10) for _ in range(count)
        ]
        try:
            js = connections[0]._client.jetstream()
            await trio_asyncio.aio_as_trio(js.create_key_value)(
                KeyValueConfig(
                    bucket=name,
                    history=1,
                    storage=StorageType.FILE,
                    max_value_size=spec.max_value_size,
                    ttl=spec.max_age or None,
                    direct=True,
                )
            )
            handles = []
            for connection in connections:
                kv = await connection.key_value(name)
                assert kv is not None
                handles.append(kv)
            yield handles
        finally:
            try:
                await trio_asyncio.aio_as_trio(js.delete_key_value)(name)
            finally:
                for connection in connections:
                    await connection.drain()
