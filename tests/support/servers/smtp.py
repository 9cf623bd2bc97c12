"""A real SMTP server for the tests: aiosmtpd in its own thread, on 127.0.0.1.

It records every message exactly as it arrived (``ReceivedMessage.raw``: the
DATA bytes after dot-unstuffing, headers not re-parsed, so folding and
encoding bugs stay visible) and can misbehave on demand: latency before the
DATA reply, scripted reply codes for MAIL/RCPT/DATA, a dropped connection
after DATA, STARTTLS with a ``trustme`` CA, and AUTH.

Behaviours are plain attributes and small methods on ``SmtpServer``; they may
be changed between tests while the server runs. Connection-level settings
(``tls``, ``require_starttls``, ``auth_*``) apply to connections opened after
the change; per-command ones (latency, scripted replies, dropping) apply at
once.
"""

from __future__ import annotations

import asyncio
import collections
import email
import email.policy
import logging
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from emailrelay.api import TRACKING_HEADER
from tests.support.waiting import (
    LOOPBACK,
    free_port,
    wait_for_port,
    wait_for_port_closed,
    wait_until,
)

Command = Literal["MAIL", "RCPT", "DATA"]

ACCEPTED = "250 OK"


class _DropLoginDataDeprecation(logging.Filter):
    """aiosmtpd logs a deprecation of its own ``Session.login_data`` on every AUTH; not ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Session.login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_DropLoginDataDeprecation())


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server received it.

    ``raw`` is the DATA content byte for byte as it came over the wire (after
    dot-unstuffing): assert header formatting on it, not on ``parsed``.
    """

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    mail_options: list[str] = field(default_factory=list)
    over_tls: bool = False
    auth_login: str | None = None
    received_at: float = field(default_factory=time.time)
    """Wall-clock time (``time.time()``) the whole message had arrived."""

    @property
    def parsed(self) -> EmailMessage:
        """The message parsed with the modern email policy (headers decoded and unfolded)."""
        return email.message_from_bytes(self.raw, policy=email.policy.default)

    def header_lines(self) -> list[bytes]:
        """The raw header section split into physical lines (folded lines stay separate)."""
        head, _, _ = self.raw.partition(b"\r\n\r\n")
        return head.split(b"\r\n")

    def tracking(self) -> tuple[str, str] | None:
        """(group id, email id) from the raw tracking header line, its name matched
        case-insensitively as mail systems do; None when the message has none."""
        name = TRACKING_HEADER.lower().encode() + b":"
        for line in self.header_lines():
            if line.lower().startswith(name):
                value = line[len(name) :].strip().decode(errors="replace")
                group_id, _, email_id = value.rpartition("/")
                return group_id, email_id
        return None


def tracked_email_ids(messages: Iterable[ReceivedMessage]) -> list[str]:
    """The email id in the tracking header of each message that has one, in order."""
    return [tracking[1] for message in messages if (tracking := message.tracking()) is not None]


@dataclass(frozen=True)
class AuthAttempt:
    """A client sent AUTH (whatever the server answered)."""

    mechanism: str
    over_tls: bool
    succeeded: bool


def scripted_reply(code: int, text: str | None = None) -> str:
    """An SMTP reply line for ``code`` with a matching enhanced status code."""
    return f"{code} {code // 100}.0.0 {text or 'scripted reply from the test SMTP server'}"


class _Script:
    """Replies to hand out for one command: a queue for the next N, then an optional 'always'."""

    def __init__(self) -> None:
        self.next: collections.deque[str] = collections.deque()
        self.always: str | None = None

    def take(self) -> str | None:
        if self.next:
            return self.next.popleft()
        return self.always


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP protocol plus what the tests observe: connections and AUTH attempts.

    ``auth_required`` is enforced here rather than passed to aiosmtpd: aiosmtpd
    warns (UserWarning) when AUTH is required without TLS, and a warning raised
    in the server thread under ``-W error`` would break the connection instead
    of the test. Enforcing it ourselves keeps the combination usable without
    touching the process-wide warning filters from a second thread.
    """

    def __init__(self, handler: _Handler, *, require_auth: bool, **kwargs: Any) -> None:
        super().__init__(handler, auth_required=False, **kwargs)
        self._owner = handler.owner
        self._require_auth = require_auth
        self._seen = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again on the same protocol after STARTTLS: count the first call only.
        if not self._seen:
            self._seen = True
            self._owner._connection_opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._owner._connection_closed(self)
        super().connection_lost(error)

    async def check_auth_needed(self, caller_method: str) -> bool:
        assert self.session is not None
        if self._require_auth and not self.session.authenticated:
            await self.push("530 5.7.0 Authentication required")
            return True
        return False

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        assert self.session is not None
        mechanism = arg.split()[0].upper() if arg else ""
        over_tls = _is_encrypted(self)
        try:
            await super().smtp_AUTH(arg)
        finally:
            self._owner._auth_attempted(
                AuthAttempt(mechanism, over_tls, succeeded=bool(self.session.authenticated))
            )

    def close_connection(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Handler:
    """aiosmtpd hooks: scripted replies, latency, recording."""

    def __init__(self, owner: SmtpServer) -> None:
        self.owner = owner

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self.owner._record_mail()
        reply = self.owner._take_reply("MAIL") or self.owner._throttle()
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return ACCEPTED

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.owner._take_reply("RCPT")
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return ACCEPTED

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            raw=bytes(envelope.original_content or b""),
            mail_options=list(envelope.mail_options),
            over_tls=_is_encrypted(server),
            auth_login=login.decode() if isinstance(login, bytes) else None,
        )
        self.owner._record_data()
        if self.owner.latency > 0:
            await asyncio.sleep(self.owner.latency)
        if self.owner.drop_connection_after_data:
            self.owner._record(message, accepted=True)
            assert isinstance(server, _RecordingSMTP)
            server.close_connection()
            # connection_lost cancels this task; no reply is ever written.
            await asyncio.Event().wait()
        reply = self.owner._take_reply("DATA")
        self.owner._record(message, accepted=reply is None)
        return reply if reply is not None else ACCEPTED


def _is_encrypted(server: SMTP) -> bool:
    """aiosmtpd sets ``session.ssl`` after STARTTLS only; implicit TLS shows on the transport."""
    if server.session is not None and server.session.ssl is not None:
        return True
    transport = server.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


class _Controller(Controller):
    """Builds each connection's protocol from the server's settings at connect time."""

    def __init__(self, owner: SmtpServer, **kwargs: Any) -> None:
        self.owner = owner
        super().__init__(_Handler(owner), **kwargs)

    def factory(self) -> SMTP:
        return _RecordingSMTP(self.handler, **self.SMTP_kwargs, **self.owner._connection_settings())


class SmtpServer:
    """An SMTP server on 127.0.0.1 (free port) that records what it receives.

    Recorded state, all reset by ``reset()``:

    - ``messages``: every complete DATA that was not refused by a scripted reply
      (a message whose connection was dropped after DATA counts: it was received).
    - ``rejected``: messages refused by a scripted DATA reply.
    - ``auth_attempts``: every AUTH command, answered or refused.
    - ``connections``: connections opened.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        tls: bool = False,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        auth_username: str | None = None,
        auth_password: str | None = None,
        auth_required: bool = False,
        auth_require_tls: bool = True,
        data_size_limit: int | None = 2**25,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.host = LOOPBACK
        self._defaults: dict[str, Any] = {
            "tls": tls,
            "require_starttls": require_starttls,
            "auth_username": auth_username,
            "auth_password": auth_password,
            "auth_required": auth_required,
            "auth_require_tls": auth_require_tls,
        }
        self.data_size_limit = data_size_limit
        self.implicit_tls = implicit_tls
        self._lock = threading.Lock()
        self._ca: trustme.CA | None = None
        self._server_tls: ssl.SSLContext | None = None
        self._messages: list[ReceivedMessage] = []
        self._rejected: list[ReceivedMessage] = []
        self._auth_attempts: list[AuthAttempt] = []
        self._connections = 0
        self._mail_times: list[float] = []
        self._data_times: list[float] = []
        self._accepted_mail: collections.deque[float] = collections.deque()
        self._throttled = 0
        self._open: set[_RecordingSMTP] = set()
        self._scripts: dict[Command, _Script] = {}
        self._controller: _Controller | None = None
        self._restore_behaviours()

    # behaviours

    tls: bool
    require_starttls: bool
    auth_username: str | None
    auth_password: str | None
    auth_required: bool
    auth_require_tls: bool
    latency: float
    """Seconds to wait before the final reply to DATA."""
    drop_connection_after_data: bool
    """Read the whole message, record it, then close the connection without replying."""
    max_rate: float
    """Transactions (MAIL) accepted per second, as SES enforces its sending rate:
    a MAIL beyond ``max_rate`` in the last second is answered ``454 Throttling
    failure: Maximum sending rate exceeded`` (counted in ``throttled``). 0: no limit."""

    def _restore_behaviours(self) -> None:
        for name, value in self._defaults.items():
            setattr(self, name, value)
        self.latency = 0.0
        self.drop_connection_after_data = False
        self.max_rate = 0.0
        with self._lock:
            self._accepted_mail.clear()
            self._throttled = 0
            self._scripts = {"MAIL": _Script(), "RCPT": _Script(), "DATA": _Script()}

    def fail_next(
        self, command: Command, code: int, count: int = 1, text: str | None = None
    ) -> None:
        """Answer the next ``count`` ``command``s with ``code``; later ones behave as before."""
        with self._lock:
            self._scripts[command].next.extend([scripted_reply(code, text)] * count)

    def fail_all(self, command: Command, code: int, text: str | None = None) -> None:
        """Answer every ``command`` with ``code`` (after any queued ``fail_next`` replies)."""
        with self._lock:
            self._scripts[command].always = scripted_reply(code, text)

    def fail_next_data(self, code: int, count: int = 1) -> None:
        self.fail_next("DATA", code, count)

    def fail_all_data(self, code: int) -> None:
        self.fail_all("DATA", code)

    def fail_next_mail(self, code: int, count: int = 1) -> None:
        self.fail_next("MAIL", code, count)

    def fail_next_rcpt(self, code: int, count: int = 1) -> None:
        self.fail_next("RCPT", code, count)

    def stop_failing(self, command: Command) -> None:
        """Forget the scripted replies for ``command`` (queued and 'always')."""
        with self._lock:
            self._scripts[command] = _Script()

    def reset(self) -> None:
        """Forget everything received and restore the behaviours given to the constructor."""
        self._restore_behaviours()
        with self._lock:
            self._messages.clear()
            self._rejected.clear()
            self._auth_attempts.clear()
            self._connections = 0
            self._mail_times.clear()
            self._data_times.clear()

    # observations

    @property
    def mail_times(self) -> list[float]:
        """Unix time of every MAIL command (a transaction starting), since the last ``reset()``."""
        with self._lock:
            return list(self._mail_times)

    @property
    def data_times(self) -> list[float]:
        """Unix time of every message whose DATA content had arrived, before the server
        waits ``latency`` and replies: from then on the relay is waiting in mid-DATA."""
        with self._lock:
            return list(self._data_times)

    def wait_for_data(self, n: int, timeout: float = 10.0) -> list[float]:
        """``data_times`` once at least ``n`` messages have reached the end of DATA."""
        wait_until(
            lambda: len(self.data_times) >= n,
            timeout=timeout,
            message=f"SMTP server saw DATA of {len(self.data_times)} of {n} messages",
        )
        return self.data_times

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def rejected(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._rejected)

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        with self._lock:
            return list(self._auth_attempts)

    @property
    def connections(self) -> int:
        """Connections opened since start or the last ``reset()``."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """All messages received so far, once there are at least ``n``."""
        wait_until(
            lambda: len(self.messages) >= n,
            timeout=timeout,
            message=f"SMTP server received {len(self.messages)} of {n} messages",
        )
        return self.messages

    # TLS

    @property
    def ca(self) -> trustme.CA:
        """The test CA that signed the server certificate (for 127.0.0.1 and localhost)."""
        with self._lock:
            if self._ca is None:
                self._ca = trustme.CA()
            return self._ca

    def write_ca_pem(self, path: Path | str) -> Path:
        """Write the CA certificate as PEM (for ``SSL_CERT_FILE``); returns the path."""
        path = Path(path)
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's certificate (and nothing else)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(context)
        return context

    def _server_ssl_context(self) -> ssl.SSLContext:
        ca = self.ca
        with self._lock:
            if self._server_tls is None:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ca.issue_cert(LOOPBACK, "localhost").configure_cert(context)
                self._server_tls = context
            return self._server_tls

    # lifetime

    def start(self, timeout: float = 10.0) -> None:
        if self._controller is not None:
            raise RuntimeError("SMTP server is already running")
        if self.tls or self.implicit_tls:
            self._server_ssl_context()  # make the certificate now, not on first connect
        controller = _Controller(
            self,
            # An explicit selector loop: asyncio.new_event_loop() would hand out
            # trio-asyncio's thread-bound loop once trio_asyncio is imported.
            loop=asyncio.SelectorEventLoop(),
            hostname=LOOPBACK,
            port=self.port,
            server_hostname="localhost",  # else aiosmtpd asks socket.getfqdn() (DNS)
            ready_timeout=timeout,
            data_size_limit=self.data_size_limit,
            # SMTPS: TLS from the first byte (ports 465/2465 in production).
            ssl_context=self._server_ssl_context() if self.implicit_tls else None,
        )
        controller.start()
        self._controller = controller
        # Controller.start() opens one connection of its own to check the server
        # answers; let it finish so it does not count.
        wait_until(
            lambda: self.connections >= 1 and self.open_connections == 0,
            timeout=timeout,
            message="the SMTP controller's start-up connection did not close",
        )
        with self._lock:
            self._connections = 0

    def stop(self, timeout: float = 10.0) -> None:
        """Close client connections, then stop the server thread."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        with self._lock:
            protocols = list(self._open)
        for protocol in protocols:
            controller.loop.call_soon_threadsafe(protocol.close_connection)
        wait_until(
            lambda: self.open_connections == 0,
            timeout=timeout,
            message="SMTP connections did not close",
        )
        controller.stop()

    def go_away(self, timeout: float = 10.0) -> None:
        """An outage: close the listening socket (connections are refused) and drop
        every open connection, until ``come_back()``. What was received is kept."""
        controller = self._require_controller()
        server = controller.server
        if server is not None:
            server.close()
        with self._lock:
            protocols = list(self._open)
        for protocol in protocols:
            controller.loop.call_soon_threadsafe(protocol.close_connection)
        wait_for_port_closed(self.host, self.port, timeout=timeout)

    def come_back(self, timeout: float = 10.0) -> None:
        """Listen again on the same port after ``go_away()``."""
        controller = self._require_controller()

        async def listen() -> None:
            # aiosmtpd has no public "listen again"; _create_server() is what its
            # own start() runs, with this server's settings.
            controller.server = await controller._create_server()

        asyncio.run_coroutine_threadsafe(listen(), controller.loop).result(timeout)
        wait_for_port(self.host, self.port, timeout=timeout)

    def _require_controller(self) -> _Controller:
        if self._controller is None:
            raise RuntimeError("SMTP server is not running")
        return self._controller

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

    # called from the server thread

    def _connection_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "require_auth": self.auth_required,
            "auth_require_tls": self.auth_require_tls,
        }
        if self.tls:
            settings["tls_context"] = self._server_ssl_context()
            settings["require_starttls"] = self.require_starttls
        if self.auth_username is not None:
            settings["authenticator"] = self._authenticate
        return settings

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.auth_username is not None
            and self.auth_password is not None
            and auth_data.login == self.auth_username.encode()
            and auth_data.password == self.auth_password.encode()
        )
        # handled=False: aiosmtpd answers 535 itself on failure.
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def _take_reply(self, command: Command) -> str | None:
        with self._lock:
            return self._scripts[command].take()

    @property
    def throttled(self) -> int:
        """MAIL commands answered 454 for exceeding ``max_rate``."""
        with self._lock:
            return self._throttled

    def _throttle(self) -> str | None:
        """The 454 reply when this MAIL exceeds ``max_rate`` (a one-second window)."""
        if self.max_rate <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            while self._accepted_mail and now - self._accepted_mail[0] >= 1.0:
                self._accepted_mail.popleft()
            if len(self._accepted_mail) >= max(1, int(self.max_rate)):
                self._throttled += 1
                return "454 Throttling failure: Maximum sending rate exceeded"
            self._accepted_mail.append(now)
        return None

    def _record_mail(self) -> None:
        with self._lock:
            self._mail_times.append(time.time())

    def _record_data(self) -> None:
        with self._lock:
            self._data_times.append(time.time())

    def _record(self, message: ReceivedMessage, *, accepted: bool) -> None:
        with self._lock:
            (self._messages if accepted else self._rejected).append(message)

    def _auth_attempted(self, attempt: AuthAttempt) -> None:
        with self._lock:
            self._auth_attempts.append(attempt)

    def _connection_opened(self, protocol: _RecordingSMTP) -> None:
        with self._lock:
            self._connections += 1
            self._open.add(protocol)

    def _connection_closed(self, protocol: _RecordingSMTP) -> None:
        with self._lock:
            self._open.discard(protocol)
