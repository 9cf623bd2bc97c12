"""How the service's parts run together: who asks to stop, how a failing
part waits before trying again, and how many things run at once.

* :class:`Lifecycle`: the parts' agreement to stop (first reason kept).
* :class:`Backoff`: the one retry schedule, capped exponential with jitter.
* :func:`start_bounded`: start a task once a slot is free (bounded fan-out).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Lifecycle:
    """How the parts agree to stop: anyone may ask, the first reason is kept.

    ``hurry`` is called when waiting for in-flight requests is pointless (a
    second signal, or a NATS connection that can carry no reply any more)."""

    stopping: anyio.Event = field(default_factory=anyio.Event)
    failure: str | None = None
    hurry: Callable[[], None] = lambda: None

    def stop(self) -> None:
        self.stopping.set()

    def fail(self, part: str) -> None:
        if self.failure is None:
            self.failure = part
        self.stopping.set()

    async def supervise(self, part: str, run_part: Callable[[], Awaitable[None]]) -> None:
        """Run a part; if it fails, ask everything to stop (non-zero exit)."""
        try:
            await run_part()
        except Exception:
            log.exception("fatal failure; shutting down", extra={"part": part})
            self.fail(part)


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with "equal jitter": before retry ``n``
    (1, 2, ...) wait a random time in ``[nominal/2, nominal]``, where
    ``nominal = min(maximum, initial * 2**(n-1))``.

    Half the wait is fixed and half is random: replicas (or a burst of
    requests) do not retry in step, yet none retries sooner than half the
    nominal delay, as "full jitter" (``[0, nominal]``) would allow."""

    initial: float = 1.0
    maximum: float = 30.0
    uniform: Callable[[float, float], float] = random.uniform

    def nominal(self, attempt: int) -> float:
        return min(self.maximum, self.initial * 2.0 ** min(max(0, attempt - 1), 64))

    def delay(self, attempt: int) -> float:
        nominal = self.nominal(attempt)
        # Clamped: a misbehaving random source never shortens or stretches the gap.
        return min(nominal, max(nominal / 2, float(self.uniform(nominal / 2, nominal))))

    async def sleep(self, attempt: int) -> None:
        await anyio.sleep(self.delay(attempt))


async def start_bounded(
    tg: TaskGroup,
    limiter: anyio.CapacityLimiter,
    work: Callable[[T], Awaitable[None]],
    item: T,
) -> None:
    """Wait for a free slot of ``limiter``, then run ``work(item)`` in ``tg``;
    the slot is freed when it ends. Waiting here, before the start, is what
    keeps the work that waits bounded: the caller takes no more until a slot
    is free."""
    await limiter.acquire_on_behalf_of(item)

    async def run() -> None:
        try:
            await work(item)
        finally:
            limiter.release_on_behalf_of(item)

    tg.start_soon(run)
