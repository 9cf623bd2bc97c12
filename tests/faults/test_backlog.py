"""Memory stays flat under a sustained overload: 10x the rate one relay can
send, for 60 s.

The sustainable rate is measured first, in the same run (closed loop, as
many callers as MAX_IN_FLIGHT, against an SMTP server with a fixed latency).
Then callers publish at ten times that rate, each waiting 10 s (with the
``Emailrelay-Deadline`` header, as the client sends it). The relay's RSS is
sampled throughout; the figures are printed (``-s`` shows them).

Asserted: RSS grows by less than 25 MB between the first 15 s and the end
(without a bound the backlog alone would grow by ~0.5 GB), the backlog never
exceeds twice MAX_BACKLOG, every request got one reply or "no responders"
(the relay had left the queue group), and no email went out for a caller that
did not get a success.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from emailrelay import api
from tests.conftest import RelayFactory
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.smtp import SmtpServer, tracked_email_ids

pytestmark = pytest.mark.faults

SMTP_LATENCY = 0.25
MAX_IN_FLIGHT = 2
MAX_BACKLOG = 64
OVERLOAD = 10
DURATION = 60.0
CALLER_TIMEOUT = 10.0
T = TypeVar("T")

HTML = "<p>" + "x" * (64 * 1024) + "</p>"
REQUEST = send_request(html=HTML)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def deadline_header(timeout: float) -> dict[str, str]:
    return {api.DEADLINE_HEADER: str(int((time.time() + timeout) * 1000))}


async def _one(nc: NatsClient, outcomes: Counter[str], ok_ids: set[str]) -> None:
    payload = json.dumps(REQUEST).encode()
    try:
        msg = await nc.request(
            api.SEND_EMAIL_SUBJECT,
            payload,
            timeout=CALLER_TIMEOUT,
            headers=deadline_header(CALLER_TIMEOUT),
        )
    except nats.errors.NoRespondersError:
        outcomes["no responders"] += 1
        return
    except nats.errors.TimeoutError:
        outcomes["caller timeout"] += 1
        return
    reply = json.loads(msg.data)
    if "email_id" in reply:
        ok_ids.add(reply["email_id"])
        outcomes["ok"] += 1
    else:
        outcomes[reply.get("error", "?")] += 1


async def closed_loop(url: str, seconds: float, callers: int) -> float:
    """Sends per second with ``callers`` callers each waiting for its reply."""
    nc = await nats.connect(url)
    outcomes: Counter[str] = Counter()
    ids: set[str] = set()
    end = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < end:
            await _one(nc, outcomes, ids)

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.monotonic() - started
    await nc.close()
    return outcomes["ok"] / elapsed


async def open_loop(url: str, rate: float, seconds: float) -> tuple[Counter[str], set[str]]:
    """Publish at ``rate`` per second for ``seconds``, whatever the replies do."""
    nc = await nats.connect(url, max_reconnect_attempts=-1)
    outcomes: Counter[str] = Counter()
    ok_ids: set[str] = set()
    tasks = []
    started = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - started < seconds:
        due = int((now - started) * rate)
        while sent < due:
            tasks.append(asyncio.ensure_future(_one(nc, outcomes, ok_ids)))
            sent += 1
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)
    await nc.close()
    return outcomes, ok_ids


def in_thread(coroutine_factory: Callable[[], Coroutine[Any, Any, T]]) -> Future[T]:
    """Run an asyncio coroutine on a loop of its own in a thread (a selector
    loop: trio-asyncio's, the default once imported, cannot run in a thread)."""
    future: Future[T] = Future()

    def run() -> None:
        loop = asyncio.SelectorEventLoop()
        try:
            future.set_result(loop.run_until_complete(coroutine_factory()))
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            loop.close()

    threading.Thread(target=run, daemon=True).start()
    return future


def test_memory_stays_flat_at_ten_times_the_sustainable_rate(
    relay_factory: RelayFactory, nats_server: NatsServer, smtp: SmtpServer
) -> None:
    smtp.latency = SMTP_LATENCY
    relay = relay_factory(
        {
            "MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
            "SMTP_POOL_SIZE": str(MAX_IN_FLIGHT),
            "MAX_BACKLOG": str(MAX_BACKLOG),
            "LOG_LEVEL": "warning",
        }
    )
    url = nats_server.url
    sustainable = in_thread(lambda: closed_loop(url, 10.0, MAX_IN_FLIGHT)).result(timeout=60)
    # MAX_IN_FLIGHT callers against SMTP_LATENCY: about 8/s on a quiet machine. A
    # rate near 0 would offer no load and let every assertion below pass.
    assert sustainable >= 1.0, f"sustainable rate {sustainable:.2f}/s: the relay is not sending"
    rate = OVERLOAD * sustainable
    smtp.reset()
    smtp.latency = SMTP_LATENCY

    load = in_thread(lambda: open_loop(url, rate, DURATION))
    started = time.monotonic()
    samples: list[tuple[float, float, float, float]] = []
    while not load.done():
        samples.append(
            (
                time.monotonic() - started,
                rss_mb(relay.pid),
                relay.metric("emailrelay_request_backlog"),
                relay.metric("emailrelay_request_intake_paused"),
            )
        )
        time.sleep(2.0)  # a sampling interval, not a wait for a condition
    outcomes, ok_ids = load.result()
    relay.terminate()
    assert relay.wait(timeout=60) == 0, relay.logs()[-5000:]

    print(f"\nsustainable rate (closed loop, {MAX_IN_FLIGHT} callers): {sustainable:.1f}/s")
    print(f"offered: {rate:.1f}/s for {DURATION:g}s = {sum(outcomes.values())} requests")
    print(f"outcomes: {dict(outcomes)}")
    print(f"emails received by SMTP: {len(smtp.messages)}")
    print(" t(s)  RSS(MB)  backlog  paused")
    for t, rss, backlog, paused in samples:
        print(f"{t:5.0f}  {rss:7.1f}  {backlog:7.0f}  {paused:6.0f}")

    offered = sum(outcomes.values())
    assert offered >= 0.9 * rate * DURATION, f"only {offered} requests offered"
    assert max(paused for _, _, _, paused in samples) == 1, "intake never paused: no overload"
    early = max(rss for t, rss, _, _ in samples if t <= 15)
    assert max(rss for _, rss, _, _ in samples) - early < 25, "RSS kept growing"
    assert max(backlog for _, _, backlog, _ in samples) <= 2 * MAX_BACKLOG
    assert outcomes["caller timeout"] == 0
    received = set(tracked_email_ids(smtp.messages))
    assert received <= ok_ids, "an email went out for a caller that got no success"
