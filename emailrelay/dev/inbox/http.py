"""Just enough HTTP for the inbox: a request read whole, a response sent whole,
and routes matched by method and a path pattern. Everything else about HTTP is
hypercorn's (see :mod:`emailrelay.health`)."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

from emailrelay.health import Receive, Scope, Send

MAX_BODY = 64 * 1024
"""The largest request body read (an event is a few bytes): more is refused with 413."""


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, str]
    """Path parameters, URL-decoded."""
    query: dict[str, str]
    """The first value of each query parameter."""
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    async def send(self, send: Send, *, head: bool = False) -> None:
        headers = [
            (b"content-type", self.content_type.encode()),
            (b"content-length", str(len(self.body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            *((name.encode(), value.encode()) for name, value in self.headers),
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else self.body})


def json_response(status: int, value: Any) -> Response:
    return Response(status, json.dumps(value).encode(), "application/json")


def json_error(status: int, message: str) -> Response:
    """The API's errors: ``{"error": message}``."""
    return json_response(status, {"error": message})


Handler = Callable[[Request], Awaitable[Response]]
Streamer = Callable[[Request, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler | None = None
    streamer: Streamer | None = None
    """Writes its own response (server-sent events) instead of returning one."""


def route(method: str, template: str, handler: Handler) -> Route:
    """``template`` such as ``/api/v1/messages/{email_id}/raw``: each ``{name}``
    matches one path segment."""
    return Route(method, _compile(template), handler=handler)


def stream(method: str, template: str, streamer: Streamer) -> Route:
    return Route(method, _compile(template), streamer=streamer)


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    return re.compile(f"^{pattern}$")


async def dispatch(routes: list[Route], scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one HTTP request: the first route whose pattern and method match;
    404 when no pattern matches, 405 when only the method is wrong. ``HEAD``
    is answered as ``GET`` without the body."""
    method = scope["method"]
    # The path as sent (still percent-encoded), so an encoded "/" inside an id
    # stays inside its segment; each parameter is decoded once matched.
    raw_path = scope.get("raw_path") or scope["path"].encode()
    path = raw_path.decode("latin-1").split("?", 1)[0]
    wanted = "GET" if method == "HEAD" else method
    matched = [(r, m) for r in routes if (m := r.pattern.match(path)) is not None]
    found = next(((r, m) for r, m in matched if r.method == wanted), None)
    if found is None:
        status, message = (405, "method not allowed") if matched else (404, "not found")
        error = json_error(status, message) if path.startswith("/api/") else None
        await (error or Response(status, f"{message}\n".encode())).send(send)
        return
    route_, match = found
    try:
        body = await _read_body(receive)
    except BodyTooLarge:
        await json_error(413, f"request body over {MAX_BODY} bytes").send(send)
        return
    request = Request(
        method=wanted,
        path=scope["path"],
        params={name: unquote(value) for name, value in match.groupdict().items()},
        query={
            name: values[0]
            for name, values in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()
        },
        body=body,
    )
    if route_.streamer is not None:
        await route_.streamer(request, receive, send)
        return
    assert route_.handler is not None
    response = await route_.handler(request)
    await response.send(send, head=method == "HEAD")


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
