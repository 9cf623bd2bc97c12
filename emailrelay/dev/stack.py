"""The dev stack: embedded nats-server, SMTP capture and the relay, in one command.

::

    emailrelay dev
    ├── nats-server child (own session; JetStream in <state>/nats)   stopped last
    ├── SMTP capture (aiosmtpd thread; .eml files in <state>/capture)
    ├── the relay itself, in this process (app.serve, EMAIL_ENABLED=true, no TLS)
    ├── the dev inbox: captured mail in a browser (hypercorn; see .inbox)
    └── engagement events (Delivery per captured message, `emailrelay dev event`)
        into an in-memory queue that app.serve polls as it polls SQS (see .engagement)

Ctrl-C (SIGINT to the process group), SIGTERM and SIGHUP (the terminal closed)
all take the same path: the relay drains and answers what is in flight, then
the capture stops, then the nats-server child gets SIGTERM and is waited for.
Exit 0, nothing left behind; if this process is killed outright, the kernel
stops nats-server (see .natsserver). One stack per state directory (see
.state). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import trio

from emailrelay import api, app
from emailrelay.bridge.loop import asyncio_loop
from emailrelay.bridge.nats import NatsConnection, NatsUnavailable, connected_to_nats
from emailrelay.client import EmailRelayClient, EmailRelayError, RelayUnavailable
from emailrelay.command import EXIT_FAILURE, EXIT_OK, EXIT_STATE_DIR_IN_USE, command_name
from emailrelay.config import ConfigError, Settings, load_settings
from emailrelay.dev import LOOPBACK
from emailrelay.dev.natsserver import (
    INSTALL_HINT,
    EmbeddedNatsServer,
    NatsEndpoints,
    NatsServerError,
)
from emailrelay.dev.sesapi import LocalSesApi, capturing_ses, use_local_ses
from emailrelay.dev.state import StackInfo, StateDirInUse, StateDirLock
from emailrelay.discovery import SERVICE_NAME
from emailrelay.health import bind_http_socket, why_unbindable
from emailrelay.logs import configure_logging

if TYPE_CHECKING:
    from emailrelay.dev.capture import CapturedMessage, CaptureServer
    from emailrelay.dev.engagement import DevEngagement

READY_TIMEOUT = 30.0
DEFAULT_MONITORING_PORT = 8222


@dataclass(frozen=True)
class DevOptions:
    """Ports of 0 mean "any free port"; the real ones are printed."""

    nats_port: int = 4222
    smtp_port: int = 1025
    http_port: int = 8080
    inbox_port: int = 8025
    state_dir: Path = Path(".emailrelay-dev")
    transport: str = "smtp"
    """``ses``: the relay sends through a local SES v2 endpoint (see .sesapi)."""
    nats_monitoring_port: int | None = None
    """``None``: 8222 beside the default NATS port 4222, else any free port (a
    stack moved off the default ports does not take 8222 either)."""

    @property
    def monitoring_port(self) -> int:
        if self.nats_monitoring_port is not None:
            return self.nats_monitoring_port
        return DEFAULT_MONITORING_PORT if self.nats_port == DevOptions.nats_port else 0

    @property
    def state_dir_flag(self) -> str:
        """`` --state-dir DIR`` for hints, when it is not the default."""
        if self.state_dir == DevOptions.state_dir:
            return ""
        return f" --state-dir {shlex.quote(str(self.state_dir))}"


def run_dev(options: DevOptions) -> int:
    """Run the stack until Ctrl-C, SIGTERM or SIGHUP; the exit code."""
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        _say(f"emailrelay dev: aiosmtpd is not installed: {INSTALL_HINT}", err=True)
        return EXIT_FAILURE
    state_dir = options.state_dir.resolve()
    try:
        lock = StateDirLock.acquire(state_dir)
    except StateDirInUse as exc:
        _say(f"emailrelay dev: {exc}", err=True)
        return EXIT_STATE_DIR_IN_USE
    with lock:
        problems = [
            problem
            for port, flag in (
                (options.nats_port, "--nats-port"),
                (options.smtp_port, "--smtp-port"),
                (options.monitoring_port, "--nats-monitoring-port"),
                (options.inbox_port, "--inbox-port"),
            )
            if (problem := _port_problem(port, flag))
        ]
        http_socket = _bind_http(options.http_port, problems)
        if problems:
            # Every taken port at once: a second stack learns all it must change.
            for problem in problems:
                _say(f"emailrelay dev: {problem}", err=True)
            if http_socket is not None:
                http_socket.close()
            return EXIT_FAILURE
        if http_socket is None:  # never: a failed bind is one of the problems
            return EXIT_FAILURE
        with http_socket:
            try:
                return trio.run(_run_until_signal, options, lock, http_socket)
            except KeyboardInterrupt:  # Ctrl-C before trio installed its handlers
                return EXIT_OK


def _bind_http(port: int, problems: list[str]) -> socket.socket | None:
    """The relay's HTTP socket, bound now; ``None`` (and why, in ``problems``) if taken."""
    try:
        return bind_http_socket(LOOPBACK, port)
    except OSError as exc:
        problems.append(_unbindable(exc, port, "--port"))
        return None


def _port_problem(port: int, flag: str) -> str | None:
    """Why ``port`` cannot be listened on, checked before anything starts (the
    server binds it a moment later; a race then still fails, less clearly)."""
    if port == 0:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError as exc:
            return _unbindable(exc, port, flag)
    return None


def _unbindable(exc: OSError, port: int, flag: str) -> str:
    return f"{why_unbindable(exc, LOOPBACK, port, flag)} (0 picks any free port)"


async def _run_until_signal(
    options: DevOptions, lock: StateDirLock, http_socket: socket.socket
) -> int:
    """Start-up and clean-up listen for signals here; while the relay serves,
    its own signal watcher (app.serve) takes SIGINT and SIGTERM and drains first."""
    code = EXIT_OK
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:

            async def cancel_on_signal() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        # The terminal is gone: stop as for SIGTERM, through the
                        # relay's own drain when it is serving (its watcher gets it).
                        signal.raise_signal(signal.SIGTERM)
                    else:
                        tg.cancel_scope.cancel()

            tg.start_soon(cancel_on_signal)
            code = await _run_stack(options, lock, http_socket)
            tg.cancel_scope.cancel()
    _say("emailrelay dev: stopped")
    return code


async def _run_stack(options: DevOptions, lock: StateDirLock, http_socket: socket.socket) -> int:
    from emailrelay.dev.capture import CaptureServer
    from emailrelay.dev.engagement import DevEngagement

    state_dir = lock.state_dir
    nats_server = EmbeddedNatsServer(
        options.nats_port,
        store_dir=state_dir / "nats",
        run_dir=state_dir / "run",
        log_file=state_dir / "nats-server.log",
        monitoring_port=options.monitoring_port,
    )
    engagement = DevEngagement()

    def on_captured(message: CapturedMessage) -> None:
        _say(message.summary())
        engagement.on_captured(message)

    capture = CaptureServer(state_dir / "capture", options.smtp_port, on_captured)
    local_ses: LocalSesApi | None = None
    try:
        try:
            endpoints = await nats_server.start()
        except NatsServerError as exc:
            _say(f"emailrelay dev: {exc}", err=True)
            return EXIT_FAILURE
        try:
            await anyio.to_thread.run_sync(capture.start)
        except OSError as exc:
            _say(f"emailrelay dev: {_unbindable(exc, capture.port, '--smtp-port')}", err=True)
            return EXIT_FAILURE
        if options.transport == "ses":
            local_ses = capturing_ses(capture.keep)
            local_ses.start()
            _say(f"emailrelay dev: the relay sends through the SES API at {local_ses.endpoint_url}")
        try:
            settings = relay_settings(
                endpoints,
                capture.port,
                http_socket.getsockname()[1],
                ses_endpoint_url=local_ses.endpoint_url if local_ses else None,
            )
        except ConfigError as exc:
            _say(f"emailrelay dev: configuration error: {exc}", err=True)
            return EXIT_FAILURE
        configure_logging(settings.log_level, settings.log_format, settings.log_add_source)
        return await _run_relay(
            settings, options, endpoints, capture, engagement, lock, http_socket
        )
    finally:
        with anyio.CancelScope(shield=True):
            if local_ses is not None:
                await anyio.to_thread.run_sync(local_ses.stop)
            await anyio.to_thread.run_sync(capture.stop)
            await nats_server.stop()


DEV_DEFAULTS: dict[str, str] = {
    "LOG_FORMAT": "text",
    "SUPPRESSION_ENABLED": "true",
    "EVENTS_STREAM_ENABLED": "true",
}
"""Settings ``emailrelay dev`` turns on unless the environment sets them (an
empty value counts as unset): a laptop shows what production can do. One row
per setting."""


def relay_settings(
    endpoints: NatsEndpoints, smtp_port: int, http_port: int, ses_endpoint_url: str | None = None
) -> Settings:
    """The developer's environment for everything else, with the stack's wiring
    forced and :data:`DEV_DEFAULTS` where the environment says nothing
    (``ses_endpoint_url``: send through that local SES endpoint)."""
    env = dict(os.environ)
    for name in ("SMTP_USERNAME", "SMTP_PASSWORD", "NATS_CREDS", "SES_ENGAGEMENT_SQS_QUEUE_URL"):
        env.pop(name, None)  # the capture has no AUTH; there is no SQS here
    for name, value in DEV_DEFAULTS.items():
        if not env.get(name, "").strip():
            env[name] = value
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
    if ses_endpoint_url is not None:
        env.update(use_local_ses(ses_endpoint_url))
    return load_settings(env)


async def _run_relay(
    settings: Settings,
    options: DevOptions,
    endpoints: NatsEndpoints,
    capture: CaptureServer,
    engagement: DevEngagement,
    lock: StateDirLock,
    http_socket: socket.socket,
) -> int:
    from emailrelay.dev.inbox import DevInbox

    async with asyncio_loop():
        try:
            async with connected_to_nats(
                settings.nats_urls, settings.nats_creds, settings.nats_connect_timeout
            ) as nats:
                # The relay creates missing buckets itself; opening them here first
                # proves JetStream and both buckets are there before anyone sends.
                tracking = await app.open_tracking_store(nats, settings)
                if tracking is None:
                    _say(
                        "emailrelay dev: JetStream KV is not available; see the log above", err=True
                    )
                    return EXIT_FAILURE
                from emailrelay.dev.capture import erase_captured

                tracking.after_erasure(
                    lambda address: anyio.to_thread.run_sync(
                        erase_captured, capture.directory, address
                    )
                )
                try:
                    inbox_socket = bind_http_socket(LOOPBACK, options.inbox_port)
                except OSError as exc:
                    problem = _unbindable(exc, options.inbox_port, "--inbox-port")
                    _say(f"emailrelay dev: {problem}", err=True)
                    return EXIT_FAILURE
                inbox = DevInbox(capture.directory, engagement.queue)
                info = stack_info(settings, endpoints, capture, inbox_socket.getsockname()[1])
                _print_urls(info, endpoints, lock.state_dir, kv_buckets(settings))
                async with anyio.create_task_group() as tg:
                    await tg.start(inbox.serve, tracking, inbox_socket)
                    await tg.start(engagement.run, nats, info)
                    tg.start_soon(_announce_when_serving, info, lock, options.state_dir_flag)
                    tg.start_soon(warn_about_other_relays, nats)
                    code = await app.serve(
                        settings,
                        nats,
                        http_socket=http_socket,
                        tracking=tracking,
                        events=app.EventSource(
                            engagement.queue,
                            "dev event poller",
                            "the dev event queue",
                            through=inbox.watching,
                        ),
                    )
                    tg.cancel_scope.cancel()
                return code
        except NatsUnavailable as exc:
            _say(f"emailrelay dev: {exc}", err=True)
            return EXIT_FAILURE


OTHER_RELAYS_INTERVAL = 5.0
"""Seconds between two looks for relays that are not this stack's."""


async def warn_about_other_relays(
    nats: NatsConnection, interval: float = OTHER_RELAYS_INTERVAL
) -> None:
    """Say once per relay when one that is not this stack's answers in its
    queue group (an ``emailrelay serve`` pointed at this NATS): it takes a
    share of the sends, and with EMAIL_ENABLED unset answers them as skipped.
    Found through service discovery (``$SRV.INFO.emailrelay``)."""
    own = {"hostname": socket.gethostname(), "pid": str(os.getpid())}
    warned: set[str] = set()
    while True:
        for relay in await _relays(nats):
            metadata = relay.get("metadata") or {}
            service_id = str(relay.get("id", ""))
            if service_id in warned or all(metadata.get(k) == v for k, v in own.items()):
                continue
            warned.add(service_id)
            what = (
                "it sends for real"
                if metadata.get("email_enabled") == "true"
                else "its EMAIL_ENABLED is not true, so it answers its share as skipped"
            )
            _say(
                f"emailrelay dev: warning: another relay (PID {metadata.get('pid', '?')} on "
                f"{metadata.get('hostname', '?')}, service id {service_id}) answers in the "
                f"queue group {api.QUEUE_GROUP} on this NATS and takes a share of the sends: "
                f"{what}. Stop it, or point its NATS_URL elsewhere.",
                err=True,
            )
        await anyio.sleep(interval)


async def _relays(nats: NatsConnection) -> list[dict[str, Any]]:
    try:
        replies = await nats.gather_replies(f"$SRV.INFO.{SERVICE_NAME}", 0.5)
    except Exception:  # NATS reconnecting: look again next time
        return []
    found = []
    for reply in replies:
        with contextlib.suppress(ValueError):
            body = json.loads(reply)
            if isinstance(body, dict):
                found.append(body)
    return found


def stack_info(
    settings: Settings, endpoints: NatsEndpoints, capture: CaptureServer, inbox_port: int
) -> StackInfo:
    from emailrelay.dev.engagement import DEV_EVENTS_SUBJECT

    return StackInfo(
        pid=os.getpid(),
        nats_url=endpoints.client_url,
        smtp_url=f"smtp://{LOOPBACK}:{capture.port}",
        http_url=f"http://{LOOPBACK}:{settings.port}",
        capture_dir=str(capture.directory),
        events_subject=DEV_EVENTS_SUBJECT,
        inbox_url=f"http://{LOOPBACK}:{inbox_port}/",
    )


async def _announce_when_serving(info: StackInfo, lock: StateDirLock, state_flag: str) -> None:
    """Publish ``stack.json`` and print the first-email line once the relay
    answers a request.

    The probe is an empty send request: the relay rejects it before sending
    anything (``to, subject, html, and text are required``)."""
    async with EmailRelayClient.connect(
        info.nats_url, timeout=2, name="emailrelay-dev-probe"
    ) as probe:
        with anyio.move_on_after(READY_TIMEOUT):
            while True:
                try:
                    await probe.request(api.SEND_EMAIL_SUBJECT, {})
                    break
                except RelayUnavailable:
                    await anyio.sleep(0.05)
                except EmailRelayError:
                    break
    lock.publish(info)
    command = command_name()
    server = "" if info.nats_url == "nats://127.0.0.1:4222" else f" --server {info.nats_url}"
    _say(
        "\nReady. Send a first email:\n"
        f"  {command} send{server} --to someone@example.com --subject 'Hello' "
        "--text 'It works.' --html '<p>It works.</p>'\n"
        "Every captured email gets a Delivery event; open, click, bounce, complaint with:\n"
        f"  {command} dev event open{state_flag} --email-id EMAIL_ID\n"
        "Ctrl-C stops everything.\n"
    )


def kv_buckets(settings: Settings) -> list[str]:
    """The buckets the relay opens (creating them when missing) with these settings."""
    names = [api.RECIPIENTS_BUCKET, api.GROUP_INDEX_BUCKET, api.IDEMPOTENCY_BUCKET]
    if settings.suppression_enabled:
        names.append(api.SUPPRESSIONS_BUCKET)
    return names


def _print_urls(
    info: StackInfo, endpoints: NatsEndpoints, state_dir: Path, buckets: list[str]
) -> None:
    _say(
        f"emailrelay dev: state in {state_dir}\n"
        f"  NATS             {info.nats_url}\n"
        f"  NATS monitoring  {endpoints.monitoring_url}\n"
        f"  SMTP capture     {info.smtp_url}  -> {info.capture_dir}/*.eml\n"
        f"  relay health     {info.http_url}/livez  {info.http_url}/readyz\n"
        f"  relay metrics    {info.http_url}/metrics\n"
        f"  inbox            {info.inbox_url}\n"
        f"  KV buckets       {', '.join(buckets)}\n"
        f"  SES events       {info.events_subject} (dev only; see `{command_name()} dev event -h`)"
    )


def _say(text: str, *, err: bool = False) -> None:
    # The terminal may be gone (SIGHUP): stopping cleanly matters more than the line.
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
