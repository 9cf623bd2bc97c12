"""Relay processes for the fault tests, their metrics, and a health watcher.

Each relay gets its own ``DEFAULT_SMTP_FROM_DISPLAY_NAME`` (its name), so the
audit can tell from an email's ``From`` line which relay sent it, and logs at
``info`` (debug lines for thousands of requests would cost the 2 CPUs more
than the relay's work).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self

import httpx

from tests.support.servers.relay import EnvOverrides, RelayProcess, relay_defaults
from tests.support.servers.smtp import SmtpServer


def fault_relay_env(
    nats_url: str, smtp: SmtpServer, name: str, env: EnvOverrides | None = None
) -> dict[str, str | None]:
    """:func:`~tests.support.servers.relay.relay_defaults`, logging at ``info``, with
    ``name`` as the From display name; ``env`` wins."""
    return {
        **relay_defaults(nats_url, smtp),
        "LOG_LEVEL": "info",
        "DEFAULT_SMTP_FROM_DISPLAY_NAME": name,
        **(env or {}),
    }


@contextlib.contextmanager
def running_relays(
    nats_urls: Sequence[str],
    smtp: SmtpServer,
    env: EnvOverrides | None = None,
    *,
    ready_timeout: float = 30.0,
) -> Iterator[list[RelayProcess]]:
    """One ready relay per NATS URL (``relay-0``, ``relay-1``, ...), closed afterwards."""
    relays = [
        RelayProcess(fault_relay_env(url, smtp, f"relay-{n}", env))
        for n, url in enumerate(nats_urls)
    ]
    try:
        for relay in relays:
            relay.start()
        for relay in relays:
            relay.wait_ready(timeout=ready_timeout)
        yield relays
    finally:
        for relay in relays:
            relay.close()


# --- metrics -------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


@dataclass(frozen=True)
class Sample:
    name: str
    labels: str
    value: float


def scrape(relay: RelayProcess) -> list[Sample]:
    """Every sample on ``/metrics`` (an empty list when the relay does not answer)."""
    try:
        text = relay.get("/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return []
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples.append(Sample(match.group(1), match.group(2) or "", float(match.group(3))))
    return samples


def metric_total(samples: Sequence[Sample], name: str) -> float | None:
    """The sum over labels of a counter or gauge (``name`` or ``name_total``); None if absent."""
    values = [s.value for s in samples if s.name in (name, f"{name}_total")]
    return sum(values) if values else None


def largest_observation_bound(samples: Sequence[Sample], name: str) -> float | None:
    """For a gauge: its value. For a histogram: the smallest bucket bound holding every
    observation (an upper bound of the largest one). None if the metric is absent."""
    gauge = [s.value for s in samples if s.name == name]
    if gauge:
        return max(gauge)
    buckets = [s for s in samples if s.name == f"{name}_bucket"]
    if not buckets:
        return None
    total = max(s.value for s in buckets)
    bounds = []
    for sample in buckets:
        bound = re.search(r'le="([^"]+)"', sample.labels)
        if bound and sample.value >= total:
            bounds.append(float(bound.group(1)))
    return min(bounds) if bounds else None


# --- health -----------------------------------------------------------------------


class Periodic:
    """Calls :meth:`tick` every ``interval`` seconds in a thread, from ``__enter__``
    until ``__exit__`` (which waits for the thread)."""

    interval: float

    def tick(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval)


@dataclass
class HealthWatch(Periodic):
    """Polls ``/livez`` and ``/readyz`` of each relay every ``interval`` in a thread
    and keeps every answer that was not 200 (None: no answer within 2 s)."""

    relays: Mapping[str, RelayProcess]
    interval: float = 0.1
    bad: list[tuple[float, str, str, int | None]] = field(default_factory=list)
    polls: int = 0

    def tick(self) -> None:
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            for name, relay in self.relays.items():
                for path in ("/livez", "/readyz"):
                    try:
                        status: int | None = client.get(relay.base_url + path).status_code
                    except httpx.HTTPError:
                        status = None
                    if status != 200:
                        self.bad.append((time.time(), name, path, status))
        self.polls += 1

    def failures(self, path: str) -> list[tuple[float, str, str, int | None]]:
        return [b for b in self.bad if b[2] == path]


def wait_ready_since(relay: RelayProcess, since: float, timeout: float = 30.0) -> float:
    """Wait for ``/readyz`` 200; seconds from ``since`` (a ``time.time()``) until it was."""
    relay.wait_ready(timeout=timeout)
    return time.time() - since
