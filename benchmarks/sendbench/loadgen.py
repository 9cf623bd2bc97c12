"""The callers: plain nats-py on asyncio, in a process of their own.

Sends ``--warmup`` requests (to ``--warmup-group``), prints ``ready``, waits
for a line on stdin, then sends ``--n`` requests with ``--c`` in flight and
prints one JSON line: elapsed seconds, every latency, the ids of the
successes and the count of each error. A reply is a success when it is a JSON
object without ``error``.

``--kind send`` sends ordinary emails (about 2 KB of HTML and text, all to
one group); ``--kind ping`` sends a tiny payload (for the trivial responder).

    python -m benchmarks.sendbench.loadgen --url nats://... --subject S --n 2000 --c 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import nats
import nats.errors
from nats.aio.client import Client

REQUEST_TIMEOUT = 60.0

TEXT = (
    "Hello,\n\nYou are invited to the Open Source Summit. Your registration code is below;\n"
    "keep it for the check-in desk. The schedule, the venue map and the list of\n"
    "workshops are on the event site. Reply to this email if anything is wrong.\n\n"
) * 2 + "The LFX team\n"
HTML = (
    '<!doctype html><html><body style="font-family: sans-serif">'
    + "".join(f"<p>{line}</p>" for line in TEXT.splitlines() if line)
    + '<p><a href="https://events.example.org/summit?ref=email">Open the event site</a></p>'
    + "<table><tr><td>Code</td><td><b>SUMMIT-2025-XYZ</b></td></tr></table>" * 4
    + "</body></html>"
)


def send_payload(group: str) -> Callable[[int], bytes]:
    def payload(n: int) -> bytes:
        return json.dumps(
            {
                "to": f"attendee{n}@example.org",
                "subject": f"Your invitation to the Open Source Summit (#{n})",
                "html": HTML,
                "text": TEXT,
                "group_id": group,
            }
        ).encode()

    return payload


def ping_payload(n: int) -> bytes:
    return b'{"ping":%d}' % n


@dataclass
class Outcome:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


async def drive(
    nc: Client, subject: str, payload: Callable[[int], bytes], n: int, c: int
) -> Outcome:
    """``n`` requests, ``c`` in flight (closed loop: each caller sends its next
    request when the previous one is answered)."""
    outcome = Outcome()
    counter = iter(range(n))

    async def caller() -> None:
        for number in counter:
            data = payload(number)
            started = time.perf_counter()
            try:
                msg = await nc.request(subject, data, timeout=REQUEST_TIMEOUT)
            except (nats.errors.Error, TimeoutError) as exc:
                outcome.errors[f"no reply: {exc.__class__.__name__}"] += 1
                continue
            outcome.latencies.append(time.perf_counter() - started)
            try:
                reply = json.loads(msg.data)
            except ValueError:
                outcome.errors["reply not JSON"] += 1
                continue
            if not isinstance(reply, dict) or "error" in reply:
                error = reply.get("error") if isinstance(reply, dict) else reply
                outcome.errors[str(error)] += 1
            else:
                outcome.ids.append(str(reply.get("email_id", "")))

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(max(1, min(c, n)))))
    outcome.seconds = time.perf_counter() - started
    return outcome


async def run(args: argparse.Namespace) -> None:
    nc = await nats.connect(args.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        if args.kind == "send":
            measured, warm = send_payload(args.group), send_payload(args.warmup_group)
        else:
            measured = warm = ping_payload
        if args.warmup:
            warmup = await drive(nc, args.subject, warm, args.warmup, args.c)
            if warmup.errors:
                print(f"warm-up errors: {dict(warmup.errors)}", file=sys.stderr)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        outcome = await drive(nc, args.subject, measured, args.n, args.c)
        result = {
            "seconds": outcome.seconds,
            "latencies": outcome.latencies,
            "ids": outcome.ids,
            "errors": dict(outcome.errors),
        }
        print(json.dumps(result), flush=True)
    finally:
        await nc.drain()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--kind", choices=("send", "ping"), default="send")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--c", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--group", default="bench")
    parser.add_argument("--warmup-group", default="bench-warmup")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
