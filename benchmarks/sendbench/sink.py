"""The SMTP server of the benchmark, in a process of its own (aiosmtpd).

Accepts everything, waits ``--latency`` seconds before answering DATA (a
provider's processing time), and appends one line per message to ``--ids``:
the raw ``X-LFX-TRACKING-ID`` value, or ``-`` when the message has none. The
file is line-buffered, so the benchmark can count and check messages while
the sink runs. Prints ``ready`` once it listens; stops on SIGTERM.

    python -m benchmarks.sendbench.sink --port P --latency 0.05 --ids FILE
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import IO, Any

from aiosmtpd.smtp import SMTP, Envelope, Session

TRACKING_HEADER = b"x-lfx-tracking-id:"


def tracking_value(raw: bytes) -> str:
    """The raw value of the tracking header in a message's header section ("" if absent)."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[: len(TRACKING_HEADER)].lower() == TRACKING_HEADER:
            return line[len(TRACKING_HEADER) :].strip().decode("ascii", "replace")
    return ""


class Sink:
    def __init__(self, latency: float, ids: IO[str]) -> None:
        self.latency = latency
        self.ids = ids

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.latency:
            await asyncio.sleep(self.latency)
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        self.ids.write((tracking_value(raw) or "-") + "\n")
        return "250 OK"


async def serve(port: int, handler: Sink) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def protocol() -> Any:
        # hostname given: aiosmtpd would otherwise look up the FQDN (DNS).
        return SMTP(handler, hostname="bench-sink", ident="bench-sink", enable_SMTPUTF8=True)

    server = await loop.create_server(protocol, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--ids", required=True)
    args = parser.parse_args()
    with open(args.ids, "a", buffering=1) as ids:
        asyncio.run(serve(args.port, Sink(args.latency, ids)))


if __name__ == "__main__":
    main()
