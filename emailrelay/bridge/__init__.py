"""The one place that knows about trio-asyncio.

nats-py and aiosmtplib are asyncio-only libraries. The service runs on trio
with a trio-asyncio loop open (opened by :mod:`.loop`, for the service,
``emailrelay dev`` and the client alike); every call
into those libraries crosses with :func:`trio_asyncio.aio_as_trio` here, so
the rest of the code reads as plain anyio and never awaits an asyncio
coroutine directly (some nats-py calls fail with "trio.run received
unrecognized yield message" when you do).
"""
