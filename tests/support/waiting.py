"""Waiting on conditions with deadlines, and picking free loopback ports.

Tests never sleep for a fixed time: they poll a predicate until it holds or a
deadline passes, and then fail with a message that says what did not happen.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

import anyio

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it for port 0)."""
    (port,) = free_ports(1)
    return port


def free_ports(count: int) -> list[int]:
    """``count`` different free ports. Picked while all are held: two calls of
    :func:`free_port` in a row may get the same port back, and a server given
    it twice (client and monitor port) fails to start."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition not met",
) -> None:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``.

    The predicate is always tried once more at the deadline, so a slow poll
    never turns a success into a failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (waited {timeout:.1f}s)")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def wait_for(
    predicate: Callable[[], object],
    within: float = 5.0,
    interval: float = 0.001,
    message: str = "condition not met",
) -> None:
    """``wait_until`` inside a test's event loop: poll ``predicate`` between
    sleeps of ``interval`` (virtual time under an autojump clock); AssertionError
    after ``within`` seconds."""
    try:
        with anyio.fail_after(within):
            # A plain predicate over fakes' state: there is no event to wait on.
            while not predicate():  # noqa: ASYNC110
                await anyio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"{message} (waited {within:.1f}s)") from None


def port_is_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until host:port accepts TCP connections."""
    wait_until(
        lambda: port_is_open(host, port),
        timeout=timeout,
        message=f"nothing listening on {host}:{port}",
    )


def wait_for_port_closed(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until host:port refuses TCP connections."""
    wait_until(
        lambda: not port_is_open(host, port),
        timeout=timeout,
        message=f"{host}:{port} still accepts connections",
    )
