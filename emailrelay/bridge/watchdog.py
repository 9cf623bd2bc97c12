"""Is the asyncio side alive? A round trip into the trio-asyncio loop, timed.

nats-py and aiosmtplib run on the asyncio loop that trio-asyncio drives
inside trio. The HTTP server runs on trio, so ``/livez`` answering says
nothing about that loop: a loop that stopped, or one so busy that a crossing
takes seconds, leaves every request stuck while ``/livez`` stays 200. The
watchdog crosses every :data:`INTERVAL` seconds; ``/livez`` reads
:meth:`LoopWatchdog.alive`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import anyio
import trio_asyncio

log = logging.getLogger(__name__)

INTERVAL = 1.0
"""Seconds between round trips."""

STALE_AFTER = 5.0
"""Seconds without a completed round trip after which the loop counts as stalled."""


async def _round_trip() -> None:
    await trio_asyncio.aio_as_trio(asyncio.sleep)(0)


class LoopWatchdog:
    def __init__(
        self,
        cross: Callable[[], Awaitable[None]] = _round_trip,
        interval: float = INTERVAL,
        stale_after: float = STALE_AFTER,
    ) -> None:
        self._cross = cross
        self._interval = interval
        self._stale_after = stale_after
        self._last_round_trip = time.monotonic()

    def alive(self) -> bool:
        """Whether a round trip completed within the last ``stale_after`` seconds."""
        return time.monotonic() - self._last_round_trip < self._stale_after

    async def run(self) -> None:
        """Cross forever (a part of the service's task group)."""
        stalled = False
        while True:
            with anyio.move_on_after(self._stale_after):
                try:
                    await self._cross()
                except Exception as exc:  # a closed loop: no round trip, so not alive
                    log.debug("asyncio round trip failed", extra={"error": repr(exc)})
                else:
                    self._last_round_trip = time.monotonic()
            if not self.alive() and not stalled:
                log.error(
                    "asyncio loop stalled: no round trip for %gs; /livez answers 503",
                    self._stale_after,
                )
            stalled = not self.alive()
            await anyio.sleep(self._interval)
