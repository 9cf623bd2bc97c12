"""The dev stack's SMTP server: keeps every message as an ``.eml`` file.

aiosmtpd runs on its own asyncio loop in a thread, so it is independent of the
relay's trio loop. Each message is written byte for byte as received (the
DATA content) to ``<capture dir>/<time>-<n>-<email id>.eml`` (written to a
temporary name first, then renamed, so a reader never sees half a file), and
a one-line summary goes to ``on_message``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.parser
import email.policy
import itertools
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from aiosmtpd.smtp import SMTP, Envelope, Session

from emailrelay.api import TRACKING_HEADER
from emailrelay.bridge.loop import separate_asyncio_loop
from emailrelay.dev import LOOPBACK


@dataclass(frozen=True)
class CapturedMessage:
    path: Path
    mail_from: str
    rcpt_tos: tuple[str, ...]
    from_header: str
    to_header: str
    subject: str
    tracking_id: str

    def summary(self) -> str:
        tracking = self.tracking_id or "(none)"
        return (
            f"captured  From: {self.from_header}  To: {self.to_header}  "
            f"Subject: {self.subject}  tracking: {tracking}  -> {self.path.name}"
        )


class _Handler:
    def __init__(self, directory: Path, on_message: Callable[[CapturedMessage], None]) -> None:
        self.directory = directory
        self.on_message = on_message
        self._sequence = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(envelope.content, bytes) and not raw:
            raw = envelope.content
        self.keep(raw, str(envelope.mail_from), tuple(envelope.rcpt_tos))
        return "250 Message accepted for delivery"

    def keep(self, raw: bytes, mail_from: str, rcpt_tos: tuple[str, ...]) -> None:
        headers = email.message_from_bytes(raw, policy=email.policy.default)
        tracking_id = str(headers.get(TRACKING_HEADER, "") or "")
        email_id = tracking_id.rsplit("/", 1)[-1]
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{next(self._sequence):04d}"
        if email_id and all(c.isalnum() or c == "-" for c in email_id):
            name = f"{name}-{email_id}"
        path = self.directory / f"{name}.eml"
        partial = path.with_suffix(".eml.part")
        partial.write_bytes(raw)
        partial.rename(path)
        self.on_message(
            CapturedMessage(
                path=path,
                mail_from=mail_from,
                rcpt_tos=rcpt_tos,
                from_header=str(headers.get("From", "")),
                to_header=str(headers.get("To", "")),
                subject=str(headers.get("Subject", "")),
                tracking_id=tracking_id,
            )
        )


def erase_captured(directory: Path, address: str) -> int:
    """Delete the captured messages addressed to ``address`` (bare address,
    case-insensitive; the ``To`` header or, failing that, any address in it);
    how many were deleted. The dev stack's part of erasing a recipient's data."""
    from emailrelay.store.suppressions import normalize_address

    wanted = normalize_address(address)
    deleted = 0
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    for path in sorted(directory.glob("*.eml")):
        try:
            with path.open("rb") as file:
                headers = parser.parse(file)
        except OSError:
            continue
        to = str(headers.get("To", "") or "")
        addresses = {normalize_address(part) for part in to.split(",") if part.strip()}
        if wanted in addresses or normalize_address(to) == wanted:
            path.unlink(missing_ok=True)
            deleted += 1
    return deleted


class CaptureServer:
    """An SMTP server on 127.0.0.1:``port`` (0 = any free port; see :attr:`port`)."""

    def __init__(
        self,
        directory: Path,
        port: int,
        on_message: Callable[[CapturedMessage], None],
    ) -> None:
        self.directory = directory
        self.port = port
        self._handler = _Handler(directory, on_message)
        self._loop = separate_asyncio_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="smtp-capture", daemon=True
        )
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[_CaptureSession] = set()

    def start(self) -> None:
        """Bind and serve; raises OSError when the port is taken."""
        # aiosmtpd logs every SMTP command at info level; the summary line says what matters.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        try:
            self._server = future.result(timeout=10)
        except BaseException:
            self.stop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]

    def keep(self, raw: bytes, mail_from: str, rcpt_tos: tuple[str, ...]) -> None:
        """File a message that came another way (the dev stack's local SES
        endpoint) exactly as one received over SMTP."""
        self._handler.keep(raw, mail_from, rcpt_tos)

    async def _listen(self) -> asyncio.base_events.Server:
        def protocol() -> SMTP:
            return _CaptureSession(self._handler, self._sessions)

        return await self._loop.create_server(
            protocol, host=LOOPBACK, port=self.port, family=socket.AF_INET, reuse_address=True
        )

    def stop(self) -> None:
        """Stop listening, end open sessions, stop the thread."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            server, self._server = self._server, None
            asyncio.run_coroutine_threadsafe(_shut_down(server, self._sessions), self._loop).result(
                timeout=15
            )
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

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


class _CaptureSession(SMTP):
    """One SMTP connection; tracked so that stopping can close it and wait."""

    def __init__(self, handler: _Handler, sessions: set[_CaptureSession]) -> None:
        # hostname is what the server says in its greeting; no DNS look-up.
        super().__init__(handler, hostname="emailrelay-dev-capture", ident="emailrelay dev")
        self._sessions = sessions

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)
        super().connection_lost(error)


async def _shut_down(
    server: asyncio.base_events.Server | None, sessions: set[_CaptureSession]
) -> None:
    """Stop accepting, close every open session and wait until each socket is
    really closed (connection_lost), so nothing is left for the garbage collector."""
    if server is not None:
        server.close()
    open_sessions = list(sessions)
    for session in open_sessions:
        if session.transport is not None:
            session.transport.close()
    if open_sessions:
        await asyncio.wait([session.closed for session in open_sessions], timeout=5)
    current = asyncio.current_task()
    leftovers = [t for t in asyncio.all_tasks() if t is not current]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)
    if server is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)
