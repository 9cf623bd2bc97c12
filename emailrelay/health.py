"""The HTTP side, served by hypercorn on trio: ``/livez``, ``/readyz`` and
``/metrics`` (Prometheus text format, from prometheus_client's ASGI app)."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, cast

import anyio
from anyio.abc import TaskStatus
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework
from prometheus_client import make_asgi_app

from emailrelay.metrics import READY

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def health_app(
    is_ready: Callable[[], bool], is_alive: Callable[[], bool] = lambda: True
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A minimal ASGI app: liveness is "the process answers and its asyncio
    side completes round trips" (:mod:`emailrelay.bridge.watchdog`), readiness
    is "NATS is connected and the send subscription exists" (a relay cut off
    from NATS, or not yet in the queue group, cannot take requests);
    ``/metrics`` is every metric of :mod:`emailrelay.metrics`, readiness
    among them (``emailrelay_ready``, read at each scrape)."""
    metrics_app = make_asgi_app()
    READY.set_function(lambda: 1.0 if is_ready() else 0.0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/metrics" and method in ("GET", "HEAD"):
            await metrics_app(scope, receive, send)
            return
        if method not in ("GET", "HEAD"):
            status, body = 405, b"method not allowed\n"
        elif path == "/livez":
            status, body = (200, b"ok\n") if is_alive() else (503, b"asyncio loop stalled\n")
        elif path == "/readyz":
            status, body = (200, b"ok\n") if is_ready() else (503, b"not ready\n")
        else:
            status, body = 404, b"not found\n"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """An ASGI lifespan with nothing to start or stop: each step answered as done."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The HTTP port, bound now (not yet listening) and handed to
    :func:`serve_health` later: a taken port is then reported at start, in
    one line, before the relay connects to NATS or joins the queue group.
    Raises :class:`OSError`; :func:`why_unbindable` words it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as hypercorn binds
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def why_unbindable(exc: OSError, host: str, port: int, change: str) -> str:
    """One line for a failed bind, naming what to ``change`` (a variable or flag)."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use on {host}: set {change} to a free port"
    if exc.errno == errno.EACCES:
        return f"port {port} on {host} needs privileges: set {change} to a port above 1023"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}): check {change} and HTTP_HOST"


async def serve_health(
    host: str,
    port: int,
    is_ready: Callable[[], bool],
    stopping: anyio.Event,
    sock: socket.socket | None = None,
    is_alive: Callable[[], bool] = lambda: True,
    *,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stopping`` is set; started (``tg.start``) with the bound
    URLs once listening (port 0 = any).
    ``sock`` (from :func:`bind_http_socket`) is used instead of binding
    ``host:port`` and is closed when serving ends."""
    # hypercorn wraps the descriptor and closes it itself: detach ours.
    bind = f"fd://{sock.detach()}" if sock is not None else f"{host}:{port}"
    async with anyio.create_task_group() as tg:
        binds: list[str] = await tg.start(
            serve_asgi, health_app(is_ready, is_alive), bind, stopping.wait
        )
        log.info("http listening", extra={"binds": binds})
        task_status.started(binds)


async def serve_asgi(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    bind: str,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    *,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on hypercorn (``bind`` as hypercorn takes it: ``host:port``
    or ``fd://N``) until ``shutdown_trigger`` returns or this is cancelled;
    started with the bound URLs once listening."""
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    async with anyio.create_task_group() as tg:
        binds: list[str] = await tg.start(
            partial(serve, cast("ASGIFramework", app), config, shutdown_trigger=shutdown_trigger)
        )
        task_status.started(binds)
