"""A load generator that behaves like the relay's real callers and records everything.

Each request is published with a reply subject of its own under one wildcard
inbox subscription (not ``nc.request``, which keeps only the first reply), so
a second or a late reply is seen too. Like the real client it sends
``Emailrelay-Deadline`` (its give-up time in Unix ms) and waits ``timeout``
seconds (10 by default). Per request it records when it was sent and every
reply with its arrival time; :class:`Request` classifies the outcome as the
caller saw it: a relay reply, ``no responders`` (the server's 503 status, so
no relay took the request), a caller-side timeout, or a publish that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from emailrelay import api
from tests.support.nats_client import SyncNats

CALLER_TIMEOUT = 10.0
"""The relay client's default request timeout."""

DEADLINE_HEADER = "Emailrelay-Deadline"


@dataclass
class Reply:
    at: float
    data: bytes
    status: str | None

    @property
    def from_relay(self) -> bool:
        """A status message (503 no responders) comes from nats-server, not a relay."""
        return self.status is None


@dataclass
class Request:
    number: int
    subject: str
    payload: bytes
    timeout: float
    sent_at: float = 0.0
    publish_error: str | None = None
    replies: list[Reply] = field(default_factory=list)

    @property
    def deadline(self) -> float:
        return self.sent_at + self.timeout

    @property
    def relay_replies(self) -> list[Reply]:
        return [r for r in self.replies if r.from_relay]

    @property
    def answer(self) -> Reply | None:
        """The first reply the caller saw before giving up, if any."""
        first = self.replies[0] if self.replies else None
        if first is None or first.at > self.deadline:
            return None
        return first

    @property
    def outcome(self) -> str:
        """``ok``, the contract error, ``no responders``, ``timeout``, ``publish failed``
        or ``not sent`` (the load stopped first)."""
        if self.publish_error is not None:
            return "publish failed"
        if self.sent_at == 0.0:
            return "not sent"
        answer = self.answer
        if answer is None:
            return "timeout"
        if not answer.from_relay:
            return "no responders" if answer.status == "503" else f"status {answer.status}"
        body = self.body
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return str(body["error"])
        return "ok"

    @property
    def body(self) -> Any:
        answer = self.answer
        if answer is None or not answer.from_relay:
            return None
        try:
            return json.loads(answer.data)
        except ValueError:
            return answer.data

    @property
    def latency(self) -> float | None:
        answer = self.answer
        return None if answer is None else answer.at - self.sent_at


@dataclass
class LoadResult:
    requests: list[Request]
    started: float
    finished: float

    def outcomes(self) -> Counter[str]:
        return Counter(r.outcome for r in self.requests)

    def successes(self) -> list[Request]:
        return [r for r in self.requests if r.outcome == "ok"]

    def with_outcome(self, outcome: str) -> list[Request]:
        return [r for r in self.requests if r.outcome == outcome]

    def more_than_one_relay_reply(self) -> list[Request]:
        return [r for r in self.requests if len(r.relay_replies) > 1]

    def unanswered(self) -> list[Request]:
        """Requests with neither a reply in time nor a caller-side timeout (never sent)."""
        return [r for r in self.requests if r.sent_at == 0.0 and r.publish_error is None]

    def late_replies(self) -> list[Request]:
        """Requests answered by a relay only after their caller gave up."""
        return [r for r in self.requests if r.answer is None and r.relay_replies and r.sent_at > 0]

    def first_success_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first success sent after it was answered."""
        times = [
            r.answer.at for r in self.successes() if r.answer is not None and r.sent_at >= moment
        ]
        return min(times) - moment if times else None

    def longest_gap_between_successes(self) -> float:
        times = sorted(r.answer.at for r in self.successes() if r.answer is not None)
        if len(times) < 2:
            return 0.0
        return max(b - a for a, b in itertools.pairwise(times))

    def then(self, later: LoadResult) -> LoadResult:
        """This load and a later one (retries) as one result: a request number
        retried appears once per attempt, and the audit weighs every attempt."""
        return LoadResult(self.requests + later.requests, self.started, later.finished)

    def latencies(self) -> list[float]:
        return sorted(r.latency for r in self.requests if r.latency is not None)


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class LoadGenerator(SyncNats):
    """Callers on one NATS connection (reconnecting forever, like SyncNats)."""

    def __init__(
        self,
        url: str | list[str],
        *,
        timeout: float = CALLER_TIMEOUT,
        deadline_header: bool = True,
    ) -> None:
        """``deadline_header=False``: callers of the replaced relay, which send no
        ``Emailrelay-Deadline`` and just wait ``timeout`` seconds."""
        super().__init__(url, name="emailrelay-fault-load")
        self.timeout = timeout
        self.deadline_header = deadline_header
        self._stopped = asyncio.Event()
        self._prefix = f"_INBOX.load-{uuid.uuid4().hex}"
        self._requests: dict[int, Request] = {}
        self._waiting: dict[int, asyncio.Event] = {}
        self._next_number = 0
        self.run(self._subscribe())

    async def _subscribe(self) -> None:
        async def on_reply(msg: Msg) -> None:
            number = int(msg.subject.rsplit(".", 1)[-1])
            request = self._requests.get(number)
            if request is None:
                return
            headers = msg.headers or {}
            request.replies.append(Reply(time.time(), msg.data, headers.get("Status")))
            event = self._waiting.get(number)
            if event is not None:
                event.set()

        await self.nc.subscribe(
            f"{self._prefix}.*", cb=on_reply, pending_msgs_limit=0, pending_bytes_limit=0
        )
        await self.nc.flush()

    @property
    def next_number(self) -> int:
        """The number the next request started will get (numbers count up from 0)."""
        return self._next_number

    def start(
        self,
        requests: Iterable[tuple[str, bytes]],
        concurrency: int,
        *,
        rate: float | None = None,
        stop_after: float | None = None,
    ) -> Future[LoadResult]:
        """Send ``requests`` (subject, body) with at most ``concurrency`` in flight, in the
        background; ``rate``: at most that many new requests per second (paced, so a
        load lasts through a fault). ``stop_after`` seconds: send nothing new after
        that (what was not sent stays unsent, so a stuck relay cannot hold the suite)."""
        batch = []
        for subject, payload in requests:
            batch.append(Request(self._next_number, subject, payload, self.timeout))
            self._next_number += 1
        for request in batch:
            self._requests[request.number] = request
        return asyncio.run_coroutine_threadsafe(
            self._send_all(batch, concurrency, rate, stop_after), self._loop
        )

    def run_load(
        self,
        requests: Iterable[tuple[str, bytes]],
        concurrency: int,
        *,
        rate: float | None = None,
        stop_after: float | None = None,
    ) -> LoadResult:
        """``start`` and wait for the result."""
        future = self.start(requests, concurrency, rate=rate, stop_after=stop_after)
        return future.result()

    async def _send_all(
        self,
        batch: list[Request],
        concurrency: int,
        rate: float | None,
        stop_after: float | None,
    ) -> LoadResult:
        started = time.time()
        limit = asyncio.Semaphore(concurrency)

        async def one(index: int, request: Request) -> None:
            if rate is not None:
                with contextlib.suppress(TimeoutError):  # woken early by stop()
                    await asyncio.wait_for(
                        self._stopped.wait(), max(0.0, started + index / rate - time.time())
                    )
            async with limit:
                if self._stopped.is_set() or (
                    stop_after is not None and time.time() - started > stop_after
                ):
                    return
                event = asyncio.Event()
                self._waiting[request.number] = event
                request.sent_at = time.time()
                headers = (
                    {DEADLINE_HEADER: str(int(request.deadline * 1000))}
                    if self.deadline_header
                    else None
                )
                try:
                    await self.nc.publish(
                        request.subject,
                        request.payload,
                        reply=f"{self._prefix}.{request.number}",
                        headers=headers,
                    )
                except Exception as exc:
                    request.publish_error = repr(exc)
                    return
                try:
                    await asyncio.wait_for(event.wait(), self.timeout)
                except TimeoutError:
                    pass
                finally:
                    self._waiting.pop(request.number, None)

        await asyncio.gather(*(one(index, request) for index, request in enumerate(batch)))
        return LoadResult(batch, started, time.time())

    def stop(self) -> None:
        """Start no new request from now on (those sent still wait for their reply)."""
        self._loop.call_soon_threadsafe(self._stopped.set)

    def settle(self) -> None:
        """A round trip to the server, so replies already published have arrived."""
        self.run(self.nc.flush(timeout=10))


SUBJECT_PREFIX = "fault"


def send_payload(run: str, number: int, groups: int = 4, **fields: str) -> bytes:
    """A valid send whose subject (``fault <run> #<number>``) names the run and the
    request, so the audit can tie what the SMTP server received to its caller."""
    body = {
        "to": f"user{number}@example.org",
        "subject": f"{SUBJECT_PREFIX} {run} #{number}",
        "html": f"<p>{number}</p>",
        "text": str(number),
        "group_id": f"{run}-g{number % groups}",
        **fields,
    }
    return json.dumps(body).encode()


def idempotency_key(run: str, number: int) -> str:
    """The key a keyed sender gives request ``number`` of ``run`` (and every retry of it)."""
    return f"{run}-key-{number}"


def sends(
    run: str, count: int, groups: int = 4, first: int = 0, *, keyed: bool = False
) -> list[tuple[str, bytes]]:
    """``count`` valid sends numbered from ``first``; ``keyed``: each with its own
    idempotency key (:func:`idempotency_key`), as a caller that retries sends them."""
    requests = []
    for n in range(first, first + count):
        key = {"idempotency_key": idempotency_key(run, n)} if keyed else {}
        requests.append((api.SEND_EMAIL_SUBJECT, send_payload(run, n, groups, **key)))
    return requests


def is_keyed(request: Request) -> bool:
    """Whether the request carries an idempotency key (made by ``sends(keyed=True)``)."""
    try:
        body = json.loads(request.payload)
    except ValueError:
        return False
    return isinstance(body, dict) and "idempotency_key" in body


def send_number(request: Request) -> int | None:
    """The number in a request made by :func:`send_payload`."""
    try:
        subject = json.loads(request.payload).get("subject", "")
    except (ValueError, AttributeError):
        return None
    head, _, number = str(subject).rpartition(" #")
    return int(number) if head.startswith(SUBJECT_PREFIX) and number.isdigit() else None


def new_run() -> str:
    """A short id that marks this test's emails (subjects, group ids)."""
    return uuid.uuid4().hex[:12]
