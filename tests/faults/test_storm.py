"""A storm of 5,000 requests against one real relay: every hostile case of the
hardening issue mixed with valid sends and queries, 64 in flight, 10 s callers.

The storm runs once per module (:func:`storm`); each test asserts one promise
on its record: exactly one reply per request, never ``internal error``, every
valid send delivered and tracked, ``/livez`` and ``/readyz`` 200 throughout,
and the event loop's wake-up lag under 1 s while the largest payloads NATS
accepts are handled.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emailrelay import api
from tests.faults import figures
from tests.faults.audit import audit_when_tracked
from tests.faults.load import LoadResult, Request, send_payload
from tests.faults.relays import HealthWatch, Periodic, largest_observation_bound, scrape
from tests.faults.scenario import fault_scenario
from tests.support.servers.relay import RelayProcess
from tests.support.servers.smtp import SmtpServer

pytestmark = pytest.mark.faults

TOTAL = 5000
CONCURRENCY = 64
STORM_LIMIT = 90.0
"""Seconds after which nothing new is sent (a relay that stalls fails, not hangs)."""
LOOP_LAG_METRIC = "emailrelay_event_loop_lag_seconds"
MAX_LOOP_LAG = 1.0

SEND, STATUS, ANALYTICS = (
    api.SEND_EMAIL_SUBJECT,
    api.GET_EMAIL_STATUS_SUBJECT,
    api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT,
)
SEND_FIELDS = ("to", "subject", "html", "text", "from", "from_display_name", "reply_to", "group_id")
ADDRESS_FIELDS = ("to", "from", "reply_to")
QUERY_FIELDS = ((STATUS, "email_id"), (STATUS, "group_id"), (ANALYTICS, "group_id"))
# NUL and every character str.splitlines() breaks on (CRLF as one).
LINE_BREAKS = (
    "\r",
    "\n",
    "\r\n",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x85",
    "\u2028",
    "\u2029",
    "\x00",
)
LARGEST = 1024 * 1024 - 4096  # NATS's default max_payload, less the JSON around the field
WRONG_TYPES: tuple[Any, ...] = (1, 1.5, True, [], {}, ["a@example.org"], {"to": "a"})
NON_OBJECTS = (b"[]", b'"text"', b"1", b"null", b"true", b"", b"{", b"\xff\xfe", b"[{}]", b" ")

Payload = tuple[str, bytes, str]
"""(subject, body, kind): kind names the case in figures and failure messages."""


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def base_send(n: int) -> dict[str, Any]:
    return {
        "to": f"storm{n}@example.org",
        "subject": f"storm {n}",
        "html": f"<p>{n}</p>",
        "text": str(n),
        "from": "team@lfx.linuxfoundation.org",
        "from_display_name": "Storm",
        "reply_to": "help@linuxfoundation.org",
        "group_id": f"storm-{n % 8}",
    }


def with_spaces(size: int) -> str:
    """A would-be address of ``size`` characters full of spaces (the quadratic case)."""
    return ("a " * (size // 2))[: size - len("@example.org")] + "@example.org"


def hostile_payloads() -> list[Payload]:
    cases: list[Payload] = []
    long_key = "k" * 4000
    cases += [(SEND, body({**base_send(0), "group_id": long_key}), "4,000-char group_id")]
    cases += [(s, body({f: long_key}), f"4,000-char {f}") for s, f in QUERY_FIELDS]
    for name in ADDRESS_FIELDS:
        for size, label in ((64 * 1024, "64 KB"), (LARGEST, "1 MiB")):
            cases.append((SEND, body({**base_send(1), name: with_spaces(size)}), f"{label} {name}"))
    cases.append((SEND, body({**base_send(2), "subject": "s" * 900_000}), "900 KB subject"))
    cases.append((SEND, body({**base_send(3), "subject": "s" * 70_000}), "70 KB subject"))
    for name in ("subject", "html", "text", "from_display_name", "group_id"):
        cases.append((SEND, body({**base_send(4), name: "x" * LARGEST}), f"largest {name}"))
    cases += [(s, body({f: "x" * LARGEST}), f"largest {f}") for s, f in QUERY_FIELDS]
    for char in LINE_BREAKS:
        for name in SEND_FIELDS:
            value = base_send(5)[name]
            for placed in (char + value, value[:3] + char + value[3:], value + char):
                cases.append((SEND, body({**base_send(5), name: placed}), f"{char!r} in {name}"))
        for subject, name in QUERY_FIELDS:
            cases.append((subject, body({name: f"id{char}x"}), f"{char!r} in {name}"))
    for name in SEND_FIELDS:
        raw = body(base_send(6)).replace(
            b'"' + name.encode() + b'": "', f'"{name}": "\\ud800'.encode()
        )
        cases.append((SEND, raw, f"lone surrogate in {name}"))
        low = body(base_send(6)).replace(
            b'"' + name.encode() + b'": "', f'"{name}": "x\\udfff'.encode()
        )
        cases.append((SEND, low, f"lone low surrogate in {name}"))
        invalid = body(base_send(6)).replace(
            b'"' + name.encode() + b'": "', f'"{name}": "'.encode() + b"\xff"
        )
        cases.append((SEND, invalid, f"invalid UTF-8 in {name}"))
    for subject, name in QUERY_FIELDS:
        cases.append((subject, f'{{"{name}": "\\ud800"}}'.encode(), f"lone surrogate in {name}"))
    deep_array = b"[" * 2000 + b"]" * 2000
    deep_object = b'{"a":' * 2000 + b"1" + b"}" * 2000
    for subject in (SEND, STATUS, ANALYTICS):
        cases.append((subject, deep_array, "2,000-deep array"))
        cases.append((subject, deep_object, "2,000-deep object"))
        field_name = {SEND: "to", STATUS: "email_id", ANALYTICS: "group_id"}[subject]
        cases.append(
            (subject, b'{"' + field_name.encode() + b'":' + deep_array + b"}", "deep field")
        )
        cases += [(subject, raw, f"non-object {raw[:8]!r}") for raw in NON_OBJECTS]
        cases.append((subject, b"{}", "empty object"))
    for name in SEND_FIELDS:
        for wrong in WRONG_TYPES:
            cases.append(
                (SEND, body({**base_send(7), name: wrong}), f"{type(wrong).__name__} {name}")
            )
        cases.append((SEND, body({**base_send(7), name: None}), f"null {name}"))
        missing = {k: v for k, v in base_send(7).items() if k != name}
        cases.append((SEND, body(missing), f"missing {name}"))
        cases.append((SEND, body({**base_send(7), name: ""}), f"empty {name}"))
    for subject, name in QUERY_FIELDS:
        cases += [
            (subject, body({name: wrong}), f"{type(wrong).__name__} {name}")
            for wrong in WRONG_TYPES
        ]
        cases.append((subject, body({name: ""}), f"empty {name}"))
    cases.append((STATUS, body({"email_id": "a", "group_id": "b"}), "both ids"))
    cases += [
        (STATUS, body({"group_id": "g", "limit": v}), "wrong limit") for v in ("1", -1, 10**12, 1.5)
    ]
    return cases


def storm_payloads(run: str) -> list[Payload]:
    hostile = hostile_payloads()
    rng = random.Random(8)
    mixed: list[Payload] = list(hostile)
    number = 0
    while len(mixed) < TOTAL:
        roll = rng.random()
        if roll < 0.6:
            mixed.append((SEND, send_payload(run, number, groups=8), "valid send"))
            number += 1
        elif roll < 0.8:
            mixed.append((STATUS, body({"email_id": f"no-such-{rng.random()}"}), "valid status"))
        else:
            mixed.append(
                (ANALYTICS, body({"group_id": f"{run}-g{rng.randrange(8)}"}), "valid analytics")
            )
    rng.shuffle(mixed)
    return mixed


@dataclass
class Sampler(Periodic):
    """Samples the relay's loop-lag metric and RSS every half second in a thread."""

    relay: RelayProcess
    interval: float = 0.5
    lag: float | None = None
    peak_rss_kib: int = 0

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.tick()

    def tick(self) -> None:
        lag = largest_observation_bound(scrape(self.relay), LOOP_LAG_METRIC)
        if lag is not None:
            self.lag = lag if self.lag is None else max(self.lag, lag)
        try:
            status = Path(f"/proc/{self.relay.pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))


@dataclass
class Storm:
    kinds: dict[int, str]
    result: LoadResult
    health: HealthWatch
    lag: float | None
    tracked_missing: int
    relay_exit: int | None

    def kind(self, request: Request) -> str:
        return self.kinds[request.number]


@pytest.fixture(scope="module")
def storm() -> Iterator[Storm]:
    with SmtpServer() as smtp, fault_scenario(smtp, latency=0.0) as scene:
        run, load, (relay,) = scene.run, scene.load, scene.relays
        payloads = storm_payloads(run)
        first = load.next_number
        kinds = {first + n: kind for n, (_, _, kind) in enumerate(payloads)}
        with HealthWatch({"relay": relay}, interval=0.2) as health, Sampler(relay) as sampler:
            result = load.run_load(
                [(subject, data) for subject, data, _ in payloads],
                CONCURRENCY,
                stop_after=STORM_LIMIT,
            )
        load.settle()
        found = audit_when_tracked(smtp, scene.kv, run, timeout=20)
        outcomes = result.outcomes()
        figures.record("requests", len(result.requests))
        figures.record("storm duration", result.finished - result.started, "s")
        figures.record(
            "requests per second", len(result.requests) / (result.finished - result.started)
        )
        for outcome, count in sorted(outcomes.items()):
            figures.record(f"outcome {outcome}", count)
        figures.record(
            "largest event-loop lag", sampler.lag if sampler.lag is not None else "no metric"
        )
        figures.record("relay peak RSS", sampler.peak_rss_kib // 1024, "MiB")
        figures.record("health checks not 200", len(health.bad))
        yield Storm(kinds, result, health, sampler.lag, len(found.untracked()), relay.returncode)


def test_storm_every_request_gets_exactly_one_reply(storm: Storm) -> None:
    unanswered = [
        (r.number, storm.kind(r), r.outcome) for r in storm.result.requests if r.answer is None
    ]
    twice = [(r.number, storm.kind(r)) for r in storm.result.requests if len(r.replies) > 1]
    assert unanswered == [], f"{len(unanswered)} requests without a reply: {unanswered[:10]}"
    assert twice == [], f"requests answered twice: {twice[:10]}"


def test_storm_never_answers_internal_error(storm: Storm) -> None:
    internal = sorted({storm.kind(r) for r in storm.result.with_outcome(api.ERR_INTERNAL)})
    assert internal == [], f"internal error for: {internal}"


def test_storm_valid_sends_are_delivered_and_tracked(storm: Storm) -> None:
    valid = [r for r in storm.result.requests if storm.kind(r) == "valid send"]
    failed = [(r.number, r.outcome) for r in valid if r.outcome != "ok"]
    assert failed == [], f"{len(failed)} valid sends not ok: {failed[:10]}"
    assert storm.tracked_missing == 0


def test_storm_relay_stays_live_and_ready(storm: Storm) -> None:
    assert storm.relay_exit is None
    assert storm.health.polls > 0
    assert storm.health.bad == [], f"/livez or /readyz not 200: {storm.health.bad[:10]}"


def test_storm_event_loop_lag_stays_under_a_second(storm: Storm) -> None:
    assert storm.lag is not None, f"the relay exposes no {LOOP_LAG_METRIC}"
    assert storm.lag < MAX_LOOP_LAG
