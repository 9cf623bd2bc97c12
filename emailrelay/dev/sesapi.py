"""A local SES v2 ``SendEmail`` endpoint on 127.0.0.1, for ``emailrelay dev --transport ses``.

It speaks the part of the SES v2 API the relay uses: ``POST
/v2/email/outbound-emails`` with ``Content.Raw``, answered ``{"MessageId": ...}``
in SES's format, errors as SES writes them (HTTP status, ``x-amzn-ErrorType``
header, ``{"message": ...}`` body). Signatures are not checked (the relay
signs with dummy keys here). Each accepted message goes to ``on_message``
(the dev stack files it with the SMTP capture's messages). ``answer`` lets a
caller script replies (tests: throttling, paused accounts, silence).

A stdlib HTTP/1.1 server in a thread (one thread per connection, kept alive),
independent of the relay's trio loop.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from emailrelay.dev import LOOPBACK
from emailrelay.mail.ses import SEND_EMAIL_PATH


@dataclass(frozen=True)
class SesReply:
    """What the endpoint answers: ``status`` with ``error`` (an SES error
    name) and ``message``, or success (``error`` None) with a fresh id.
    ``silent``: read the request, then never answer (until stopped)."""

    status: int = 200
    error: str | None = None
    message: str = ""
    silent: bool = False


@dataclass(frozen=True)
class SentRequest:
    """One ``SendEmail`` request as received."""

    body: dict[str, Any]
    raw: bytes
    headers: dict[str, str] = field(repr=False)
    client_port: int = 0
    """The port the request came from: one per kept-alive connection."""


class LocalSesApi:
    """The endpoint; :attr:`endpoint_url` once started. ``latency``: seconds
    to wait before each answer (a distant provider)."""

    def __init__(
        self,
        port: int = 0,
        on_message: Callable[[SentRequest, str], None] | None = None,
        answer: Callable[[SentRequest], SesReply | None] | None = None,
        latency: float = 0.0,
    ) -> None:
        self._port = port
        self._on_message = on_message
        self._answer = answer
        self.latency = latency
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sequence = itertools.count(1)
        self._lock = threading.Lock()
        self.requests: list[SentRequest] = []
        """Every ``SendEmail`` request received, answered or not."""

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        owner = self

        class Handler(_Handler):
            api = owner

        self._server = ThreadingHTTPServer((LOOPBACK, self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="local-ses-api", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _reply_to(self, request: SentRequest) -> tuple[SesReply, str]:
        with self._lock:
            self.requests.append(request)
            message_id = f"0100{next(self._sequence):012x}-{time.time_ns():032x}-000000"
        scripted = self._answer(request) if self._answer is not None else None
        reply = scripted or SesReply()
        if reply.error is None and not reply.silent and self._on_message is not None:
            self._on_message(request, message_id)
        return reply, message_id


class _Handler(BaseHTTPRequestHandler):
    api: LocalSesApi
    protocol_version = "HTTP/1.1"  # keep-alive, as SES

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the dev stack prints its own line per message."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        # An absolute URI when the request came through a forward proxy.
        if urlsplit(self.path).path != SEND_EMAIL_PATH:
            self._send(
                404, {"message": f"no such operation: POST {self.path}"}, "NotFoundException"
            )
            return
        try:
            body = json.loads(data)
            raw = base64.b64decode(body["Content"]["Raw"]["Data"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            self._send(400, {"message": "Content.Raw.Data is required"}, "BadRequestException")
            return
        request = SentRequest(
            body=body,
            raw=raw,
            headers=dict(self.headers.items()),
            client_port=int(self.client_address[1]),
        )
        reply, message_id = self.api._reply_to(request)
        if reply.silent:
            self.api._stopping.wait()
            self.close_connection = True
            return
        if self.api.latency:
            time.sleep(self.api.latency)
        if reply.error is None:
            self._send(200, {"MessageId": message_id})
        else:
            self._send(reply.status, {"message": reply.message}, reply.error)

    def _send(self, status: int, payload: dict[str, str], error: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000")
        if error is not None:
            self.send_header(
                "x-amzn-ErrorType", f"{error}:http://internal.amazon.com/coral/com.amazon.sesv2/"
            )
        self.end_headers()
        self.wfile.write(data)


DEV_REGION = "us-east-1"


def dev_ses_environment(endpoint_url: str) -> dict[str, str]:
    """What ``emailrelay dev --transport ses`` gives the relay: the local
    endpoint, a region and dummy keys (botocore reads them from the process
    environment), and no instance-metadata look-ups: nothing reaches AWS."""
    return {
        "EMAIL_TRANSPORT": "ses",
        "AWS_ENDPOINT_URL_SESV2": endpoint_url,
        "AWS_REGION": DEV_REGION,
        "AWS_ACCESS_KEY_ID": "AKIDLOCALDEVONLY",
        "AWS_SECRET_ACCESS_KEY": "local-dev-not-a-secret",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def use_local_ses(endpoint_url: str) -> dict[str, str]:
    """Point this process's AWS configuration at the local endpoint (see
    :func:`dev_ses_environment`); the variables, for the relay's settings."""
    environment = dev_ses_environment(endpoint_url)
    for name in ("AWS_SESSION_TOKEN", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_PROFILE"):
        os.environ.pop(name, None)
    os.environ.update(environment)
    return environment


def capturing_ses(keep: Callable[[bytes, str, tuple[str, ...]], None]) -> LocalSesApi:
    """A local endpoint that files every accepted message with ``keep``
    (the SMTP capture's), envelope from the request."""

    def on_message(request: SentRequest, message_id: str) -> None:
        recipients = request.body.get("Destination", {}).get("ToAddresses", [])
        keep(request.raw, str(request.body.get("FromEmailAddress", "")), tuple(recipients))

    return LocalSesApi(on_message=on_message)
