"""An HTTP proxy in front of moto's SQS server that fails on demand.

The relay's SQS client talks to ``AWS_ENDPOINT_URL_SQS``; pointing that at
this proxy lets a test make the next N calls fail (HTTP 500, AWS's
``InternalError`` in the JSON protocol) or every call, and cut the calls in
flight (the poller's long polls wait up to 20 s; cutting one fails it now,
as a dropped connection would).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

from tests.support.waiting import LOOPBACK

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class FlakyProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or LOOPBACK, parts.port or 80)
        self._lock = threading.Lock()
        self._fail_next = 0
        self._fail_all = False
        self._in_flight: set[socket.socket] = set()
        self._cut: set[socket.socket] = set()
        self.calls: list[tuple[str, int]] = []
        """(X-Amz-Target action, HTTP status answered) for every call, once it ended
        (a call cut while waiting on moto ends, with status 0, when moto answers)."""
        self.forwarded: list[str] = []
        """The action of every call passed on to moto, when it was passed on."""
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    @property
    def waiting(self) -> int:
        """Calls waiting on moto now (a long poll in progress)."""
        with self._lock:
            return len(self._in_flight)

    def forwarded_of(self, action: str) -> int:
        """Calls of ``action`` passed on to moto so far (not failed by the proxy)."""
        with self._lock:
            return self.forwarded.count(action)

    def calls_of(self, action: str, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for a, s in self.calls if a == action and (status is None or s == status))

    def fail_next(self, count: int, *, cut_in_flight: bool = True) -> None:
        """Fail the next ``count`` calls; by default the calls waiting on moto now are
        cut and count among them (so exactly ``count`` calls fail)."""
        with self._lock:
            self._fail_next += count
        if cut_in_flight:
            cut = self.cut_in_flight()
            with self._lock:
                self._fail_next = max(0, self._fail_next - cut)

    def fail_all(self, *, cut_in_flight: bool = True) -> None:
        with self._lock:
            self._fail_all = True
        if cut_in_flight:
            self.cut_in_flight()

    def recover(self) -> None:
        with self._lock:
            self._fail_next = 0
            self._fail_all = False

    def cut_in_flight(self) -> int:
        """Drop the connections of calls waiting on moto (each fails at the caller);
        how many were cut."""
        with self._lock:
            waiting = list(self._in_flight)
            self._cut.update(waiting)
        for sock in waiting:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return len(waiting)

    def _should_fail(self) -> bool:
        with self._lock:
            if self._fail_all:
                return True
            if self._fail_next > 0:
                self._fail_next -= 1
                return True
            return False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                action = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
                if proxy._should_fail():
                    self._answer(
                        action,
                        500,
                        {"Content-Type": "application/x-amz-json-1.0"},
                        json.dumps(
                            {"__type": "InternalError", "message": "injected by the fault test"}
                        ).encode(),
                    )
                    return
                with proxy._lock:
                    proxy._in_flight.add(self.connection)
                    proxy.forwarded.append(action)
                try:
                    upstream = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                    }
                    upstream.request("POST", self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    upstream.close()
                    status = response.status
                    if proxy._was_cut(self.connection):
                        with proxy._lock:
                            proxy.calls.append((action, 0))
                        return
                    self._answer(action, status, dict(response.getheaders()), data)
                except OSError:
                    with proxy._lock:
                        proxy.calls.append((action, 0))
                finally:
                    with proxy._lock:
                        proxy._in_flight.discard(self.connection)

            def _answer(
                self, action: str, status: int, headers: dict[str, str], data: bytes
            ) -> None:
                with proxy._lock:
                    proxy.calls.append((action, status))
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        if name.lower() not in _HOP_BY_HOP:
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

        return Handler

    def _was_cut(self, connection: socket.socket) -> bool:
        with self._lock:
            if connection in self._cut:
                self._cut.discard(connection)
                return True
            return False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
