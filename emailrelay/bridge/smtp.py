"""aiosmtplib, usable from trio: one SMTP connection and one transaction at a time.

Every failure is classified on the asyncio side, where the phase is known:
before the message is handed over anything may be retried (subject to the
reply class); after it, a missing final reply is ambiguous and never retried.

Cancellation (a request's deadline, the shutdown cut-off) ends the envelope
(MAIL, RCPT) at once: nothing was handed over, the connection is dropped,
the provider has nothing to deliver. The DATA phase is not cut short: once
DATA is sent the provider may accept the message at any moment, so the
relay waits (at most :data:`DATA_REPLY_WAIT` seconds more) for its final
reply and reports what it said, rather than answer "failed" for a message
that went out and invite a second one.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass

import aiosmtplib
import anyio
import trio_asyncio

from emailrelay.addresses import redact_addresses_in
from emailrelay.config import SmtpTlsMode
from emailrelay.mail.errors import (
    AmbiguousFailure,
    MisconfiguredFailure,
    PermanentFailure,
    SendFailure,
    TransientFailure,
)

aio = trio_asyncio.aio_as_trio

IMPLICIT_TLS_PORTS = (465, 2465)

DATA_REPLY_WAIT = 1.0
"""Once cancelled during DATA, how much longer to wait for the provider's
final reply; beyond it the outcome is unknown and the cancellation stands
(the connection is dropped). Short on purpose: a caller without a deadline
header gets receipt + SEND_TIMEOUT (8 s), and its reply must leave by
receipt + 9.5 s to beat its 10 s timeout (a late success is as dangerous as
an error: the caller sends again). A provider that takes a second past the
deadline to answer DATA is answered as ambiguous."""


@dataclass(frozen=True)
class SmtpEndpoint:
    host: str
    port: int
    tls_mode: SmtpTlsMode
    credentials: tuple[str, str] | None
    tls_context: ssl.SSLContext
    local_hostname: str
    timeout: float

    @property
    def implicit_tls(self) -> bool:
        if self.tls_mode is SmtpTlsMode.AUTO:
            return self.port in IMPLICIT_TLS_PORTS
        return self.tls_mode is SmtpTlsMode.IMPLICIT


_SES_MESSAGE_ID = re.compile(r"^Ok ([0-9A-Za-z][0-9A-Za-z-]{0,127})\s*$")
"""SES answers an accepted DATA with ``250 Ok <message id>``; other servers
say something else (``250 OK``, ``250 2.0.0 Ok: queued as ...``)."""


def provider_message_id(reply_text: str) -> str | None:
    """The provider's message id in the final reply to DATA, where it gives one."""
    match = _SES_MESSAGE_ID.match(reply_text)
    return match.group(1) if match else None


def _reply_failure(exc: aiosmtplib.SMTPResponseException) -> SendFailure:
    reason = f"{exc.code} {redact_addresses_in(exc.message)}"
    if 400 <= exc.code < 500:
        return TransientFailure(reason, exc.code)
    return PermanentFailure(reason, exc.code)


class SmtpConnection:
    """One open, greeted (and where configured, encrypted and logged-in) connection."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self._smtp = smtp
        self._phase = _Phase()

    @property
    def data_started(self) -> bool:
        """The last :meth:`send` reached DATA: from then on a missing reply
        (timeout, cancellation) leaves the outcome unknown."""
        return self._phase.data_started

    @classmethod
    async def open(cls, endpoint: SmtpEndpoint) -> SmtpConnection:
        smtp = await aio(_open)(endpoint)
        return cls(smtp)

    async def send(self, sender: str, recipient: str, message: bytes) -> str | None:
        """Deliver in one transaction; the provider's message id, where its
        reply to DATA names one (see :func:`provider_message_id`)."""
        # MAIL, RCPT and DATA run as one asyncio task, started here without a
        # crossing and awaited in one: every crossing costs a task and a trio
        # wake-up, and a send is the relay's hottest path.
        self._phase = phase = _Phase()
        loop = trio_asyncio.current_loop.get()
        transaction = loop.create_task(_transaction(self._smtp, sender, recipient, message, phase))
        try:
            return await _outcome(transaction)
        except anyio.get_cancelled_exc_class():
            if not phase.data_started:
                # Still in the envelope: nothing was handed over.
                _abandon(transaction)
                raise
            # Cancelled during DATA: find out whether the provider took it.
            with anyio.CancelScope(shield=True), anyio.move_on_after(DATA_REPLY_WAIT):
                await _outcome(transaction)
            if not transaction.done():
                _abandon(transaction)
                raise
            # The provider answered: report what it said (a success stands,
            # and the cancellation is raised again at the caller's next
            # checkpoint, after the caller has taken note).
            message_id: str | None = transaction.result()
            return message_id

    async def close(self) -> None:
        await aio(_close)(self._smtp)

    def abort(self) -> None:
        """Drop the connection without a goodbye (its state is unknown).

        ``transport.abort()`` discards what is still unsent, where a plain
        close would flush it: a message not yet fully written then never
        reaches the provider, so "not sent" stays true."""
        transport = self._smtp.transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        self._smtp.close()


async def _open(endpoint: SmtpEndpoint) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname=endpoint.host,
        port=endpoint.port,
        use_tls=endpoint.implicit_tls,
        start_tls=False,  # decided in _greet, per SMTP_TLS_MODE
        tls_context=endpoint.tls_context,
        local_hostname=endpoint.local_hostname,  # no DNS look-up of our own name
        timeout=endpoint.timeout,
    )
    try:
        await _greet(smtp, endpoint)
    except Exception:
        await _close(smtp)
        raise
    except BaseException:
        smtp.close()
        raise
    return smtp


async def _greet(smtp: aiosmtplib.SMTP, endpoint: SmtpEndpoint) -> None:
    """Connect, EHLO, encrypt and log in as the endpoint asks; failures classified."""
    try:
        await smtp.connect()
        await smtp.ehlo()
        encrypted = endpoint.implicit_tls
        wants_starttls = endpoint.tls_mode in (SmtpTlsMode.AUTO, SmtpTlsMode.STARTTLS)
        if not encrypted and wants_starttls:
            if smtp.supports_extension("starttls"):
                await smtp.starttls()
                encrypted = True
            elif endpoint.tls_mode is SmtpTlsMode.STARTTLS:
                raise PermanentFailure("SMTP_TLS_MODE=starttls but the server does not offer it")
        if endpoint.credentials is not None:
            if not encrypted and endpoint.tls_mode is not SmtpTlsMode.NONE:
                raise PermanentFailure(
                    "refusing to send SMTP credentials without TLS: the server offers no "
                    "STARTTLS (set SMTP_TLS_MODE=none only for a trusted local relay)"
                )
            if smtp.is_ehlo_or_helo_needed:
                await smtp.ehlo()  # STARTTLS forgets what the first EHLO said
            if not smtp.supports_extension("auth"):
                # aiosmtplib reports this as a plain SMTPException, which
                # would read as transient and be retried until the deadline.
                raise MisconfiguredFailure(
                    f"SMTP_USERNAME is set but {endpoint.host}:{endpoint.port} does not "
                    "offer SMTP AUTH: no send can succeed; point SMTP_HOST/SMTP_PORT at a "
                    "server that authenticates, or unset SMTP_USERNAME and SMTP_PASSWORD"
                )
            await smtp.login(*endpoint.credentials)
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise PermanentFailure(f"SMTP authentication failed: {exc.code}", exc.code) from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise _reply_failure(exc) from exc
    except ssl.SSLError as exc:
        raise PermanentFailure(f"TLS failed: {exc.reason or exc}") from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise TransientFailure(f"connecting failed: {exc.__class__.__name__}: {exc}") from exc


@dataclass
class _Phase:
    """Set on the asyncio side the moment DATA begins, read on the trio side."""

    data_started: bool = False


async def _transaction(
    smtp: aiosmtplib.SMTP, sender: str, recipient: str, message: bytes, phase: _Phase
) -> str | None:
    # No per-command timeouts: the trio side bounds the whole transaction (the
    # pool's scope ends at SEND_TIMEOUT or the request's deadline, never later
    # than a command timeout of SmtpEndpoint.timeout would), and each of them
    # costs a timer and a waiter on the trio-asyncio loop.
    try:
        await smtp.mail(sender, timeout=None)
        await smtp.rcpt(recipient, timeout=None)
    except aiosmtplib.SMTPResponseException as exc:
        raise _reply_failure(exc) from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        # A pooled connection the server closed while idle ends up here.
        raise TransientFailure(f"connection lost before DATA: {exc.__class__.__name__}") from exc
    phase.data_started = True
    try:
        reply = await smtp.data(message, timeout=None)
    except aiosmtplib.SMTPResponseException as exc:
        # An explicit reply (to DATA or after the content) means "not accepted".
        raise _reply_failure(exc) from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise AmbiguousFailure(
            f"no final reply after the message was handed over: {exc.__class__.__name__}"
        ) from exc
    return provider_message_id(reply.message)


def _abandon(task: asyncio.Task[str | None]) -> None:
    """Cancel ``task`` and consume whatever it ends with: no one awaits it any more."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _outcome(task: asyncio.Task[str | None]) -> str | None:
    """Wait (on the trio side) for ``task``; cancelling the wait leaves the task running."""
    message_id: str | None = await trio_asyncio.run_aio_future(asyncio.shield(task))
    return message_id


async def _close(smtp: aiosmtplib.SMTP) -> None:
    """QUIT if still connected, then close. The transport releases its socket on
    the next loop iteration, so give it that before returning: a caller that
    closes the loop right after must not leave the socket to the garbage collector."""
    transport = smtp.transport
    try:
        if smtp.is_connected:
            await smtp.quit(timeout=2)
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()
        if isinstance(transport, asyncio.Transport):
            # A TLS transport's close() waits for the peer's close_notify, for
            # as long as the server takes (a busy machine: longer than one
            # iteration). QUIT already ended the session, so drop the socket now.
            transport.abort()
    await asyncio.sleep(0)
