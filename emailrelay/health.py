"""The HTTP side, served by hypercorn on trio: ``/livez``, ``/readyz`` and
``/metrics`` (Prometheus text format, from prometheus_client's ASGI app)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, cast

import anyio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework
from prometheus_client import make_asgi_app

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def health_app(
    is_ready: Callable[[], bool], is_alive: Callable[[], bool] = lambda: True
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A minimal ASGI app: liveness is "the process answers and its asyncio
    side completes round trips" (:mod:`emailrelay.bridge.watchdog`), readiness
    is "NATS is connected" (a relay cut off from NATS cannot take requests);
    ``/metrics`` is every metric of :mod:`emailrelay.metrics`."""
    metrics_app = make_asgi_app()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
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
            status, body = (200, b"ok\n") if is_ready() else (503, b"nats not connected\n")
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


async def serve_health(
    host: str,
    port: int,
    is_ready: Callable[[], bool],
    stopping: anyio.Event,
    on_bound: Callable[[list[str]], None] = lambda binds: None,
    is_alive: Callable[[], bool] = lambda: True,
) -> None:
    """Serve until ``stopping`` is set; ``on_bound`` gets the bound URLs (port 0 = any)."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    async with anyio.create_task_group() as tg:
        binds: list[str] = await tg.start(
            partial(
                serve,
                cast("ASGIFramework", health_app(is_ready, is_alive)),
                config,
                shutdown_trigger=stopping.wait,
            )
        )
        log.info("http listening", extra={"binds": binds})
        on_bound(binds)
