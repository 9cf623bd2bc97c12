"""How late the event loop wakes up: ``emailrelay_event_loop_lag_seconds``.

Everything in the process (trio tasks, the trio-asyncio loop carrying nats-py
and aiosmtplib, the health server) shares one thread, so a step that holds it
(a superlinear parse, a huge MIME build) stalls every request at once. A task
that sleeps :data:`INTERVAL` and measures how much later than asked it woke
sees such a stall, whoever caused it. The gauge holds the worst lag of the
last :data:`WINDOW`, so a scrape every 15 to 30 s still sees a stall that
lasted a second; a stall shorter than :data:`INTERVAL` may go unseen.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NoReturn

import anyio

from emailrelay.metrics import EVENT_LOOP_LAG_SECONDS

INTERVAL = 0.1
WINDOW = 30.0


class LagWindow:
    """The worst of the lags recorded in the last ``window`` seconds."""

    def __init__(self, window: float = WINDOW) -> None:
        self._window = window
        self._samples: deque[tuple[float, float]] = deque()

    def record(self, now: float, lag: float) -> float:
        """Add a lag measured at ``now``; the worst one still in the window."""
        # Only samples below the new one can never be the maximum again.
        while self._samples and self._samples[-1][1] <= lag:
            self._samples.pop()
        self._samples.append((now, lag))
        while self._samples[0][0] <= now - self._window:
            self._samples.popleft()
        return self._samples[0][1]


async def watch_loop_lag(
    interval: float = INTERVAL,
    window: LagWindow | None = None,
    publish: Callable[[float], None] = EVENT_LOOP_LAG_SECONDS.set,
) -> NoReturn:
    """Measure the wake-up lag every ``interval`` seconds, forever."""
    window = window if window is not None else LagWindow()
    while True:
        due = anyio.current_time() + interval
        await anyio.sleep_until(due)
        now = anyio.current_time()
        publish(window.record(now, max(0.0, now - due)))
