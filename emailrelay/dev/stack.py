"""The dev stack: embedded nats-server, SMTP capture and the relay, in one command.

::

    emailrelay dev
    ├── nats-server child (own session; JetStream in <state>/nats)   stopped last
    ├── SMTP capture (aiosmtpd thread; .eml files in <state>/capture)
    └── the relay itself, in this process (app.serve, EMAIL_ENABLED=true, no TLS)

Ctrl-C (SIGINT to the process group) reaches this process only: the relay
drains and answers what is in flight, then the capture stops, then the
nats-server child gets SIGTERM and is waited for. Exit 0, nothing left behind.
Everything binds 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import trio
import trio_asyncio

from emailrelay import api, app
from emailrelay.bridge.nats import NatsUnavailable
from emailrelay.cli import command_name
from emailrelay.client import EmailRelayClient, EmailRelayError, RelayUnavailable
from emailrelay.config import ConfigError, Settings, load_settings
from emailrelay.dev.natsserver import (
    INSTALL_HINT,
    LOOPBACK,
    EmbeddedNatsServer,
    NatsEndpoints,
    NatsServerError,
)
from emailrelay.logs import configure_logging

if TYPE_CHECKING:
    from emailrelay.dev.capture import CapturedMessage, CaptureServer

EXIT_OK = 0
EXIT_FAILURE = 1

READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class DevOptions:
    """Ports of 0 mean "any free port"; the real ones are printed."""

    nats_port: int = 4222
    smtp_port: int = 1025
    http_port: int = 8080
    state_dir: Path = Path(".emailrelay-dev")


def run_dev(options: DevOptions) -> int:
    """Run the stack until Ctrl-C or SIGTERM; the exit code."""
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        _say(f"emailrelay dev: aiosmtpd is not installed: {INSTALL_HINT}", err=True)
        return EXIT_FAILURE
    try:
        return trio.run(_run_until_signal, options)
    except KeyboardInterrupt:  # Ctrl-C before trio installed its handlers: nothing runs yet
        return EXIT_OK


async def _run_until_signal(options: DevOptions) -> int:
    """Start-up and clean-up listen for signals here; while the relay serves,
    its own signal watcher (app.serve) takes them and drains first."""
    code = EXIT_OK
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def cancel_on_signal() -> None:
                async for _ in signals:
                    tg.cancel_scope.cancel()

            tg.start_soon(cancel_on_signal)
            code = await _run_stack(options, options.state_dir.resolve())
            tg.cancel_scope.cancel()
    _say("emailrelay dev: stopped")
    return code


async def _run_stack(options: DevOptions, state_dir: Path) -> int:
    from emailrelay.dev.capture import CaptureServer

    nats_server = EmbeddedNatsServer(
        options.nats_port,
        store_dir=state_dir / "nats",
        run_dir=state_dir / "run",
        log_file=state_dir / "nats-server.log",
    )
    capture = CaptureServer(state_dir / "capture", options.smtp_port, _print_captured)
    try:
        try:
            endpoints = await nats_server.start()
        except NatsServerError as exc:
            _say(f"emailrelay dev: {exc}", err=True)
            return EXIT_FAILURE
        try:
            await anyio.to_thread.run_sync(capture.start)
        except OSError as exc:
            _say(
                f"emailrelay dev: SMTP capture cannot listen on port {capture.port}: {exc}",
                err=True,
            )
            return EXIT_FAILURE
        try:
            settings = relay_settings(endpoints, capture.port, options.http_port or _free_port())
        except ConfigError as exc:
            _say(f"emailrelay dev: configuration error: {exc}", err=True)
            return EXIT_FAILURE
        configure_logging(settings.log_level, settings.log_format, settings.log_add_source)
        return await _run_relay(settings, endpoints, capture, state_dir)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(capture.stop)
            await nats_server.stop()


def relay_settings(endpoints: NatsEndpoints, smtp_port: int, http_port: int) -> Settings:
    """The developer's environment for everything else, with the stack's wiring forced."""
    env = dict(os.environ)
    for name in ("SMTP_USERNAME", "SMTP_PASSWORD", "NATS_CREDS", "SES_ENGAGEMENT_SQS_QUEUE_URL"):
        env.pop(name, None)  # the capture has no AUTH; there is no SQS here
    env.setdefault("LOG_FORMAT", "text")
    env.update(
        {
            "NATS_URL": endpoints.client_url,
            "PORT": str(http_port),
            "HTTP_HOST": LOOPBACK,
            "EMAIL_ENABLED": "true",
            "SMTP_HOST": LOOPBACK,
            "SMTP_PORT": str(smtp_port),
            "SMTP_TLS_MODE": "none",
            "SES_EVENTING_ENABLED": "false",
            "KV_AUTO_CREATE": "true",
            "NATS_CONNECT_TIMEOUT": "10",
        }
    )
    return load_settings(env)


async def _run_relay(
    settings: Settings, endpoints: NatsEndpoints, capture: CaptureServer, state_dir: Path
) -> int:
    async with trio_asyncio.open_loop():
        try:
            async with app.connected_to_nats(settings) as nats:
                # The relay creates missing buckets itself; opening them here first
                # proves JetStream and both buckets are there before anyone sends.
                if await app.open_tracking_store(nats, settings) is None:
                    _say(
                        "emailrelay dev: JetStream KV is not available; see the log above", err=True
                    )
                    return EXIT_FAILURE
                _print_urls(settings, endpoints, capture, state_dir)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_announce_when_serving, endpoints.client_url)
                    code = await app.serve(settings, nats)
                    tg.cancel_scope.cancel()
                return code
        except NatsUnavailable as exc:
            _say(f"emailrelay dev: {exc}", err=True)
            return EXIT_FAILURE


async def _announce_when_serving(nats_url: str) -> None:
    """Print the first-email line once the relay answers a request.

    The probe is an empty send request: the relay rejects it before sending
    anything (``to, subject, html, and text are required``)."""
    async with EmailRelayClient.connect(nats_url, timeout=2, name="emailrelay-dev-probe") as probe:
        with anyio.move_on_after(READY_TIMEOUT):
            while True:
                try:
                    await probe.request(api.SEND_EMAIL_SUBJECT, {})
                    break
                except RelayUnavailable:
                    await anyio.sleep(0.05)
                except EmailRelayError:
                    break
    server = "" if nats_url == "nats://127.0.0.1:4222" else f" --server {nats_url}"
    _say(
        "\nReady. Send a first email:\n"
        f"  {command_name()} send{server} --to someone@example.com --subject 'Hello' "
        "--text 'It works.' --html '<p>It works.</p>'\n"
        "Ctrl-C stops everything.\n"
    )


def _print_urls(
    settings: Settings, endpoints: NatsEndpoints, capture: CaptureServer, state_dir: Path
) -> None:
    health = f"http://{LOOPBACK}:{settings.port}"
    _say(
        f"emailrelay dev: state in {state_dir}\n"
        f"  NATS             {endpoints.client_url}\n"
        f"  NATS monitoring  {endpoints.monitoring_url}\n"
        f"  SMTP capture     smtp://{LOOPBACK}:{capture.port}  -> {capture.directory}/*.eml\n"
        f"  relay health     {health}/livez  {health}/readyz\n"
        f"  KV buckets       {api.RECIPIENTS_BUCKET}, {api.GROUP_INDEX_BUCKET}"
    )


def _print_captured(message: CapturedMessage) -> None:
    _say(message.summary())


def _say(text: str, *, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _free_port() -> int:
    """A port that was free a moment ago (hypercorn binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port
