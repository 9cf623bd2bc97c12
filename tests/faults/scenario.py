"""One fault scenario: the servers, relays, callers and KV client a fault test
runs under load, and the audit that closes it.

Every load-and-fault test has the same shape::

    with fault_scenario(fault_smtp, relays=2) as scene:
        running = scene.send_load(600, concurrency=32, rate=60, delivered_first=100)
        ...  # the fault
        result = scene.result(running)
        ...  # the test's own figures
        found = scene.audit(result)  # settle, audit, figures, the promises

:func:`fault_scenario` starts what the test does not bring:

- ``nats_urls=None`` (the default): a nats-server of the scenario's own
  (``scene.nats``, free to be killed and restarted), with ``relays`` relays
  (a count) on it; the callers and the KV client connect to it.
- ``nats_urls=[...]``: servers the test manages (a :class:`~tests.faults.cluster.NatsCluster`'s
  ``urls``, say). The callers and the KV client get every URL; ``relays`` may
  then be a list of URLs, one relay per URL, each relay's own node (for a
  cluster: ``relays=[n1.url, n2.url], nats_urls=cluster.urls``, inside the
  test's ``with NatsCluster() as cluster``; the scenario never stops servers
  it did not start, so a test may kill and restart them).
- ``callers``: the URLs the callers connect to, when not all of them (a
  cluster node kept out of the fault, say); ``deadline_header=False``: callers
  of the replaced relay, which send no deadline and wait 10 s.
- ``relay_env``: settings for every relay (``{"KV_REPLICAS": "3"}``), over
  :func:`~tests.faults.relays.fault_relay_env` (itself over
  :func:`~tests.support.servers.relay.relay_defaults`).

:meth:`Scenario.audit` is the closing audit: a round trip so every reply
published has arrived (``load.settle()``), the SMTP server's messages checked
against both buckets (waiting for late tracking writes), the load figures
recorded, then every promise of :func:`~tests.faults.audit.assert_intact`,
and one message per idempotency key for keyed senders. :meth:`Scenario.retry_keyed`
plays the caller that retries what was not a success with the same key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from tests.faults import figures
from tests.faults.audit import (
    Audit,
    Delivered,
    assert_intact,
    audit_when_tracked,
    check_callers,
    delivered,
    record_load_figures,
)
from tests.faults.load import (
    LoadGenerator,
    LoadResult,
    Request,
    is_keyed,
    new_run,
    send_number,
    sends,
)
from tests.faults.relays import running_relays
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import EnvOverrides, RelayProcess
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until


def _none_excused(message: Delivered) -> bool:
    return False


@dataclass
class Scenario:
    """What :func:`fault_scenario` started; ``nats`` is None when the test brought its servers."""

    run: str
    smtp: SmtpServer
    relays: list[RelayProcess]
    load: LoadGenerator
    kv: SyncNats
    nats: NatsServer | None

    def delivered(self) -> list[Delivered]:
        """This run's messages the SMTP server accepted so far."""
        return delivered(self.smtp, self.run)

    def wait_delivered(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` of this run's messages went out (the load is under way)."""
        wait_until(
            lambda: len(self.delivered()) >= count,
            timeout=timeout,
            message=f"{len(self.delivered())} of {count} messages delivered",
        )

    def send_load(
        self,
        count: int,
        *,
        concurrency: int,
        rate: float | None = None,
        first: int = 0,
        groups: int = 4,
        keyed: bool = False,
        delivered_first: int = 0,
    ) -> Future[LoadResult]:
        """Start ``count`` sends of this run (numbered from ``first``; ``keyed``: each
        with its idempotency key) in the background; with ``delivered_first``, return
        once that many of the run's messages went out (the load is under way)."""
        running = self.load.start(
            sends(self.run, count, groups, first, keyed=keyed), concurrency, rate=rate
        )
        if delivered_first:
            self.wait_delivered(delivered_first)
        return running

    def first_success_after(self, result: LoadResult, moment: float, label: str) -> float | None:
        """Seconds from ``moment`` (the fault's end) to the first success sent after it,
        recorded as the figure ``first success after <label>``."""
        first = result.first_success_after(moment)
        figures.record(f"first success after {label}", first if first is not None else "none")
        return first

    def result(self, running: Future[LoadResult], timeout: float = 120.0) -> LoadResult:
        """The load's result, once every request was answered or given up on."""
        return running.result(timeout=timeout)

    def retry_keyed(self, result: LoadResult, concurrency: int = 16) -> LoadResult:
        """Send again, with the same idempotency key, every keyed request that was
        not a success (a caller that timed out or was refused retries, once the
        relays that still run are ready again); the two loads as one result."""
        for relay in self.relays:
            if relay.returncode is None:
                relay.wait_ready(timeout=30)
        again = [
            (r.subject, r.payload) for r in result.requests if r.outcome != "ok" and is_keyed(r)
        ]
        if not again:
            return result
        return result.then(self.load.run_load(again, concurrency))

    def audit(
        self,
        result: LoadResult,
        *,
        excused: Callable[[Delivered], bool] = _none_excused,
        timeout: float = 30.0,
    ) -> Audit:
        """The closing audit (see the module docstring); the audit, for figures."""
        self.load.settle()
        found = audit_when_tracked(self.smtp, self.kv, self.run, timeout=timeout, excused=excused)
        record_load_figures(result, found)
        assert_intact(found, check_callers(result, found.delivered), excused=excused)
        assert keys_sent_twice(result.requests, found) == [], "an idempotency key was sent twice"
        return found


def keys_sent_twice(requests: Sequence[Request], found: Audit) -> list[int]:
    """Numbers of keyed requests (each number has its own key) delivered more than once."""
    keyed = {send_number(r) for r in requests if is_keyed(r)}
    numbers = [d.number for d in found.delivered if d.number in keyed]
    return sorted({n for n in numbers if n is not None and numbers.count(n) > 1})


@contextlib.contextmanager
def fault_scenario(
    smtp: SmtpServer,
    *,
    relays: int | Sequence[str] = 1,
    nats_urls: Sequence[str] | None = None,
    callers: Sequence[str] | None = None,
    deadline_header: bool = True,
    relay_env: EnvOverrides | None = None,
    latency: float = 0.02,
    ready_timeout: float = 30.0,
) -> Iterator[Scenario]:
    """A nats-server (unless ``nats_urls``), ready relays, the load generator and a
    KV client, all closed afterwards; ``smtp`` answers DATA after ``latency`` s.
    See the module docstring for the arguments."""
    smtp.latency = latency
    with contextlib.ExitStack() as stack:
        nats: NatsServer | None = None
        if nats_urls is None:
            nats = stack.enter_context(NatsServer())
            client_urls: list[str] = [nats.url]
        else:
            client_urls = list(nats_urls)
        relay_urls = [client_urls[0]] * relays if isinstance(relays, int) else list(relays)
        started = stack.enter_context(
            running_relays(relay_urls, smtp, relay_env, ready_timeout=ready_timeout)
        )
        load = stack.enter_context(
            LoadGenerator(_one_or_all(callers or client_urls), deadline_header=deadline_header)
        )
        kv = stack.enter_context(SyncNats(_one_or_all(client_urls)))
        yield Scenario(new_run(), smtp, started, load, kv, nats)


def _one_or_all(urls: Sequence[str]) -> str | list[str]:
    return urls[0] if len(urls) == 1 else list(urls)
