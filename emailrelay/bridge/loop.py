"""The asyncio loop under trio: opening it, and crossing into it.

nats-py and aiosmtplib are asyncio-only. Under trio a trio-asyncio loop must
be open while they run (:func:`asyncio_loop`), and every call into them
crosses with ``trio_asyncio.aio_as_trio``. The service, ``emailrelay dev``
and the client all open their loop here.

This module is what :mod:`emailrelay.client` imports, so it stays lean: the
standard library and sniffio at import time; trio-asyncio only once a trio
caller needs it (an asyncio caller never imports it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import sniffio

P = ParamSpec("P")
T = TypeVar("T")


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """A trio-asyncio loop for the length of the block (run under trio)."""
    import trio_asyncio

    async with trio_asyncio.open_loop():
        yield


def separate_asyncio_loop() -> asyncio.AbstractEventLoop:
    """A plain selector loop, for a thread of its own (``emailrelay dev``'s
    SMTP capture). Inside trio code ``asyncio.new_event_loop()`` would hand
    out a trio-asyncio loop instead, which cannot run in another thread."""
    return asyncio.SelectorEventLoop()


class AsyncioCalls:
    """Runs asyncio coroutines (nats-py's) from the caller's event loop.

    Under asyncio they are awaited directly. Under trio they go through
    ``trio_asyncio.aio_as_trio`` on a trio-asyncio loop: the one already open
    (the relay's own, say), else one opened by :meth:`open` until :meth:`close`.
    """

    def __init__(self) -> None:
        self._on_trio = False
        self._loop_context: AbstractAsyncContextManager[Any] | None = None

    async def open(self) -> None:
        self._on_trio = sniffio.current_async_library() == "trio"
        if not self._on_trio:
            return
        import trio_asyncio

        if trio_asyncio.current_loop.get() is None:
            self._loop_context = trio_asyncio.open_loop()
            await self._loop_context.__aenter__()

    async def close(self) -> None:
        if self._loop_context is not None:
            context, self._loop_context = self._loop_context, None
            # Closed as a clean exit even when the caller's block failed: the
            # caller's exception then propagates as itself, not wrapped in the
            # loop's nursery's ExceptionGroup.
            await context.__aexit__(None, None, None)

    async def __call__(
        self, function: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        if self._on_trio:
            import trio_asyncio

            result: T = await trio_asyncio.aio_as_trio(function)(*args, **kwargs)
            return result
        return await function(*args, **kwargs)
