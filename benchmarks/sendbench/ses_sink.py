"""The SES v2 API endpoint of the benchmark, in a process of its own.

The dev stack's local endpoint (emailrelay.dev.sesapi: a stdlib HTTP/1.1
server, a thread per kept-alive connection) answering every ``SendEmail``
after ``--latency`` seconds, and appending each message's raw
``X-LFX-TRACKING-ID`` value to ``--ids`` as the SMTP sink does. Prints
``ready`` once it listens; stops on SIGTERM.

    python -m benchmarks.sendbench.ses_sink --port P --latency 0.05 --ids FILE
"""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from benchmarks.sendbench.sink import tracking_value
from emailrelay.dev.sesapi import LocalSesApi, SentRequest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--ids", required=True)
    args = parser.parse_args()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(args.ids, "a", buffering=1) as ids:
        lock = threading.Lock()

        def on_message(request: SentRequest, message_id: str) -> None:
            with lock:
                ids.write((tracking_value(request.raw) or "-") + "\n")

        with LocalSesApi(args.port, on_message=on_message, latency=args.latency):
            print("ready", flush=True)
            stop.wait()


if __name__ == "__main__":
    main()
