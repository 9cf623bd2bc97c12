"""A Python client for emailrelay, for asyncio and trio callers alike.

::

    from emailrelay.client import EmailRelayClient

    async with EmailRelayClient.connect(servers="nats://127.0.0.1:4222") as relay:
        sent = await relay.send(to="a@example.com", subject="Hi", html="<p>Hi</p>", text="Hi")
        record = await relay.status(sent.email_id)

Every method returns the :mod:`emailrelay.api` model of the reply. An error
reply raises the :class:`EmailRelayError` subclass for its exact contract
string (an unknown string raises :class:`EmailRelayError` itself); no relay
answering (no responders, a timeout, NATS unreachable) raises
:class:`RelayUnavailable`.

nats-py is asyncio-only. Under trio the client opens a trio-asyncio loop for
the length of its ``async with`` block (or reuses one already open) and
crosses into it in one place, :class:`emailrelay.bridge.loop.AsyncioCalls`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import BaseModel, TypeAdapter, ValidationError

from emailrelay import api
from emailrelay.bridge.loop import AsyncioCalls

DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
EVENTS_BATCH = 16
"""Events fetched from the stream per round trip by :meth:`EmailRelayClient.events`."""
EVENTS_POLL = 1.0
"""Seconds one fetch waits for new events before looking again (or, without
``follow``, before deciding the reader has caught up)."""


# --- Errors ------------------------------------------------------------------


class EmailRelayError(Exception):
    """The relay answered with ``{"error": ...}``; ``error`` is that string,
    ``detail`` the relay's advice for people (its ``Emailrelay-Error-Detail``
    header, ``""`` without one), such as ``allowed: lfx.linuxfoundation.org``."""

    def __init__(self, error: str, detail: str = "") -> None:
        super().__init__(error)
        self.error = error
        self.detail = detail


class InvalidRequest(EmailRelayError):
    """The request was refused as it stands (``invalid request payload`` and every
    other validation error below); sending it again unchanged will not help."""


class MissingFields(InvalidRequest):
    """``to, subject, html, and text are required``."""


class InvalidToAddress(InvalidRequest):
    """``invalid to address``."""


class InvalidFromAddress(InvalidRequest):
    """``invalid from address``."""


class FromDomainNotAllowed(InvalidRequest):
    """``from address domain not allowed`` (see ``SMTP_ALLOWED_FROM_DOMAINS``)."""


class InvalidReplyToAddress(InvalidRequest):
    """``invalid reply_to address``."""


class ReplyToDomainNotAllowed(InvalidRequest):
    """``reply_to address domain not allowed`` (see ``SMTP_ALLOWED_REPLY_TO_DOMAINS``)."""


class IdRequired(InvalidRequest):
    """``email_id or group_id is required`` (status)."""


class GroupIdRequired(IdRequired):
    """``group_id is required`` (analytics)."""


class OnlyOneId(InvalidRequest):
    """``only one of email_id or group_id may be set``."""


class GroupTooLarge(InvalidRequest):
    """The group's records do not fit in one reply: page with ``limit`` and ``offset``."""


class DeliveryFailed(EmailRelayError):
    """``email delivery failed``: the SMTP provider did not accept the message."""


class IdempotencyKeyReused(InvalidRequest):
    """``idempotency key reused with a different request``: the key already
    belongs to another request; use a new key for a new email."""


class DeliveryOutcomeUnknown(EmailRelayError):
    """``email delivery outcome unknown``: the first send with this
    idempotency key may have been delivered; not retried, the caller decides."""


class RecipientSuppressed(EmailRelayError):
    """``recipient suppressed``: the address hard-bounced or complained (only
    where an operator set ``SUPPRESSION_ENABLED=true``)."""


class AddressRequired(InvalidRequest):
    """``address is required`` (suppression requests)."""


class InvalidAddress(InvalidRequest):
    """``invalid address``: not one mailbox (``suppression.add``)."""


class RecipientRequired(InvalidRequest):
    pass


class ErasureIncomplete(EmailRelayError):
    """The store failed midway through an erasure: repeat the request."""


class NotFound(EmailRelayError):
    """``not found``: no such email or group."""


class InternalError(EmailRelayError):
    """``internal error``: the relay's store failed; worth retrying later."""


class Overloaded(EmailRelayError):
    """``overloaded``: the relay already held as many reads (status,
    analytics, suppression get/list) as it takes; nothing was read. Retry
    after a pause."""


class UnexpectedReply(EmailRelayError):
    """The reply is neither an error nor the model the contract promises."""


class RelayUnavailable(Exception):
    """No relay answered: no responders on the subject, no reply before the
    timeout, or NATS itself unreachable. Not an :class:`EmailRelayError`: the
    relay never said anything (after a timeout the request may still have been
    carried out)."""


class NoResponders(RelayUnavailable):
    """Nobody serves ``subject``: no relay runs, or the ones running leave the
    subject off (the suppression subjects need ``SUPPRESSION_ENABLED=true``)."""

    def __init__(self, message: str, subject: str) -> None:
        super().__init__(message)
        self.subject = subject


ERRORS: dict[str, type[EmailRelayError]] = {
    api.ERR_INVALID_PAYLOAD: InvalidRequest,
    api.ERR_SEND_FIELDS_REQUIRED: MissingFields,
    api.ERR_INVALID_TO: InvalidToAddress,
    api.ERR_INVALID_FROM: InvalidFromAddress,
    api.ERR_FROM_DOMAIN_NOT_ALLOWED: FromDomainNotAllowed,
    api.ERR_INVALID_REPLY_TO: InvalidReplyToAddress,
    api.ERR_REPLY_TO_DOMAIN_NOT_ALLOWED: ReplyToDomainNotAllowed,
    api.ERR_DELIVERY_FAILED: DeliveryFailed,
    api.ERR_STATUS_ID_REQUIRED: IdRequired,
    api.ERR_STATUS_ONE_ID_ONLY: OnlyOneId,
    api.ERR_GROUP_ID_REQUIRED: GroupIdRequired,
    api.ERR_NOT_FOUND: NotFound,
    api.ERR_INTERNAL: InternalError,
    api.ERR_GROUP_TOO_LARGE: GroupTooLarge,
    api.ERR_IDEMPOTENCY_KEY_REUSED: IdempotencyKeyReused,
    api.ERR_DELIVERY_OUTCOME_UNKNOWN: DeliveryOutcomeUnknown,
    api.ERR_RECIPIENT_SUPPRESSED: RecipientSuppressed,
    api.ERR_ADDRESS_REQUIRED: AddressRequired,
    api.ERR_INVALID_ADDRESS: InvalidAddress,
    api.ERR_OVERLOADED: Overloaded,
    api.ERR_RECIPIENT_REQUIRED: RecipientRequired,
    api.ERR_ERASURE_INCOMPLETE: ErasureIncomplete,
}
"""Contract error string -> the exception raised for it."""


def error_for(message: str, detail: str = "") -> EmailRelayError:
    """The exception for an error reply's string."""
    error = ERRORS.get(message, EmailRelayError)(message)
    error.detail = detail
    return error


ModelT = TypeVar("ModelT", bound=BaseModel)
_RECORDS = TypeAdapter(list[api.TrackingRecord])


@dataclass(frozen=True)
class RelayReply:
    """A reply as it came: the body unchanged, and the headers (the additions
    of docs/contract.md, such as ``Emailrelay-Idempotent-Replay``)."""

    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def replayed(self) -> bool:
        """A send answered with the first reply of its idempotency key."""
        return self.headers.get(api.IDEMPOTENT_REPLAY_HEADER, "") == "true"


def decode_reply(reply: bytes, headers: Mapping[str, str] | None = None) -> Any:
    """The reply as JSON; raises the typed error for an error reply (with
    its detail when ``headers`` carry one)."""
    try:
        body = json.loads(reply)
    except ValueError:
        raise UnexpectedReply(f"reply is not JSON: {reply[:200]!r}") from None
    if isinstance(body, dict) and "error" in body:
        detail = (headers or {}).get(api.ERROR_DETAIL_HEADER, "")
        raise error_for(str(body["error"]), detail)
    return body


def _as_model(reply: RelayReply, model: type[ModelT]) -> ModelT:
    body = decode_reply(reply.data, reply.headers)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise UnexpectedReply(f"reply is not a {model.__name__}: {exc}") from None


# --- The client ----------------------------------------------------------------


def _deadline_ms(timeout: float) -> str:
    """The :data:`emailrelay.api.DEADLINE_HEADER` value: now + ``timeout``, Unix ms."""
    return str(int((time.time() + timeout) * 1000))


async def _quiet(*args: object) -> None:
    """nats-py's default callbacks log tracebacks; a client reports through exceptions."""


class EmailRelayClient:
    """A connection to the relays behind one NATS deployment.

    Use it as an async context manager: ``async with EmailRelayClient.connect(...)``.
    Once connected it reconnects after a lost connection, indefinitely; a
    request made while disconnected raises :class:`RelayUnavailable` after
    ``timeout``.
    """

    def __init__(
        self,
        servers: str | Sequence[str] = api.DEFAULT_NATS_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        name: str = "emailrelay-client",
    ) -> None:
        if isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        self.servers = list(servers)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.name = name
        self._nc: Client | None = None
        self._calls = AsyncioCalls()

    @classmethod
    def connect(
        cls,
        servers: str | Sequence[str] = api.DEFAULT_NATS_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        name: str = "emailrelay-client",
    ) -> Self:
        """A client for ``servers`` (a URL, comma-separated URLs or a list); it
        connects when its ``async with`` block is entered, and raises
        :class:`RelayUnavailable` there if no server answers within
        ``connect_timeout`` seconds. ``timeout`` bounds every request."""
        return cls(servers, timeout=timeout, connect_timeout=connect_timeout, name=name)

    async def __aenter__(self) -> Self:
        await self._calls.open()
        try:
            self._nc = await self._open_connection()
        except BaseException:
            await self._calls.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._nc is not None:
                nc, self._nc = self._nc, None
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await self._calls(nc.close)
        finally:
            await self._calls.close()

    async def _open_connection(self) -> Client:
        nc = Client()
        connected = False
        with anyio.move_on_after(self.connect_timeout):
            await self._calls(
                nc.connect,
                servers=self.servers,
                name=self.name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,  # forever; the deadline above bounds the first connect
                reconnect_time_wait=1,
                connect_timeout=max(1, int(min(self.connect_timeout, 2))),
                error_cb=_quiet,
                disconnected_cb=_quiet,
                reconnected_cb=_quiet,
                closed_cb=_quiet,
            )
            connected = True
        if not connected:
            with anyio.CancelScope(shield=True):
                await self._calls(nc.close)
            raise RelayUnavailable(
                f"cannot reach NATS at {', '.join(self.servers)} "
                f"(nothing answered within {self.connect_timeout:g}s)"
            )
        return nc

    # --- requests ---------------------------------------------------------

    async def request(self, subject: str, payload: dict[str, Any]) -> bytes:
        """Send ``payload`` as JSON to ``subject``; the reply body unchanged."""
        return (await self.exchange(subject, payload)).data

    async def exchange(self, subject: str, payload: dict[str, Any]) -> RelayReply:
        """Send ``payload`` as JSON to ``subject``; the reply's body and headers."""
        if self._nc is None:
            raise RuntimeError("use the client inside `async with EmailRelayClient.connect(...)`")
        try:
            msg = await self._calls(
                self._nc.request,
                subject,
                json.dumps(payload).encode(),
                timeout=self.timeout,
                # The relay starts no work for us after we stop waiting.
                headers={api.DEADLINE_HEADER: _deadline_ms(self.timeout)},
            )
        except nats.errors.NoRespondersError:
            raise NoResponders(
                f"no relay is serving {subject} on {', '.join(self.servers)}", subject
            ) from None
        except nats.errors.TimeoutError:
            raise RelayUnavailable(
                f"no reply on {subject} within {self.timeout:g}s "
                "(the relay may be busy, or NATS unreachable)"
            ) from None
        except nats.errors.Error as exc:
            raise RelayUnavailable(f"NATS request on {subject} failed: {exc}") from None
        data: bytes = msg.data
        return RelayReply(data, dict(msg.headers or {}))

    async def send(
        self,
        *,
        to: str,
        subject: str,
        html: str,
        text: str,
        from_: str = "",
        from_display_name: str = "",
        reply_to: str = "",
        group_id: str = "",
        idempotency_key: str = "",
    ) -> api.SendEmailReply:
        """Send one email. Optional fields left empty take the relay's defaults
        (a new ``group_id`` among them). Both ids in the reply are empty when
        the relay skipped the send on purpose (sending disabled, or a recipient
        outside its allowlist).

        ``idempotency_key`` (at most 256 characters): sending again with the
        same key and the same fields, after a :class:`RelayUnavailable`
        timeout say, answers the first reply (same ``email_id``) and never
        sends a second message; see :class:`DeliveryOutcomeUnknown` and
        :class:`IdempotencyKeyReused`."""
        fields = {
            "to": to,
            "subject": subject,
            "html": html,
            "text": text,
            "from": from_,
            "from_display_name": from_display_name,
            "reply_to": reply_to,
            "group_id": group_id,
            "idempotency_key": idempotency_key,
        }
        payload: dict[str, Any] = {name: value for name, value in fields.items() if value}
        return _as_model(await self.exchange(api.SEND_EMAIL_SUBJECT, payload), api.SendEmailReply)

    async def suppression(self, address: str) -> api.SuppressionEntry:
        """Why ``address`` is suppressed (:class:`NotFound` when it is not)."""
        reply = await self.exchange(api.SUPPRESSION_GET_SUBJECT, {"address": address})
        return _as_model(reply, api.SuppressionEntry)

    async def list_suppressions(self, limit: int = 0, offset: int = 0) -> api.SuppressionListReply:
        """A page of the suppression list (``limit`` 0: the relay's default, 100)."""
        payload = {"limit": limit, "offset": offset}
        reply = await self.exchange(api.SUPPRESSION_LIST_SUBJECT, payload)
        return _as_model(reply, api.SuppressionListReply)

    async def add_suppression(self, address: str) -> api.SuppressionChangeReply:
        """Suppress ``address`` (``changed`` false: it already was)."""
        reply = await self.exchange(api.SUPPRESSION_ADD_SUBJECT, {"address": address})
        return _as_model(reply, api.SuppressionChangeReply)

    async def remove_suppression(self, address: str) -> api.SuppressionChangeReply:
        """Allow sending to ``address`` again (``changed`` false: it was not suppressed)."""
        reply = await self.exchange(api.SUPPRESSION_REMOVE_SUBJECT, {"address": address})
        return _as_model(reply, api.SuppressionChangeReply)

    async def erase_recipient_data(
        self, recipient: str, *, suppression: bool = False
    ) -> api.EraseRecipientDataReply:
        """Remove every tracking record addressed to ``recipient`` and their
        ids from every group index (and its suppression entry when
        ``suppression``). Idempotent: a repeat erases nothing and says so;
        :class:`ErasureIncomplete` asks for one."""
        payload = {"recipient": recipient, "suppression": suppression}
        reply = await self.exchange(api.ERASE_RECIPIENT_DATA_SUBJECT, payload)
        return _as_model(reply, api.EraseRecipientDataReply)

    async def status(self, email_id: str) -> api.TrackingRecord:
        """The tracking record of one email (:class:`NotFound` if there is none)."""
        reply = await self.exchange(api.GET_EMAIL_STATUS_SUBJECT, {"email_id": email_id})
        return _as_model(reply, api.TrackingRecord)

    async def group_status(
        self, group_id: str, limit: int | None = None, offset: int | None = None
    ) -> list[api.TrackingRecord]:
        """The records of a group, in the order they were sent. A big group
        raises :class:`GroupTooLarge` unless paged with ``limit`` (1-1,000) and
        ``offset``."""
        payload: dict[str, Any] = {"group_id": group_id}
        if limit is not None:
            payload["limit"] = limit
        if offset is not None:
            payload["offset"] = offset
        reply = await self.exchange(api.GET_EMAIL_STATUS_SUBJECT, payload)
        body = decode_reply(reply.data, reply.headers)
        try:
            return _RECORDS.validate_python(body)
        except ValidationError as exc:
            raise UnexpectedReply(f"reply is not a list of records: {exc}") from None

    async def analytics(self, group_id: str) -> api.EngagementAnalyticsReply:
        """Delivery and open counts for a group."""
        reply = await self.exchange(
            api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT, {"group_id": group_id}
        )
        return _as_model(reply, api.EngagementAnalyticsReply)

    # --- events -----------------------------------------------------------

    async def events(
        self, consumer: str, types: Sequence[str] = (), *, follow: bool = False
    ) -> AsyncGenerator[api.EmailEvent, None]:
        """The ``EMAIL_EVENTS`` stream (relays with ``EVENTS_STREAM_ENABLED=true``),
        read through the durable pull consumer ``consumer``, created on first
        use (from the stream's first event) and then resumed where it was left.
        ``types`` (``"bounced"``, ...; see :data:`emailrelay.api.EVENT_TYPES`)
        filters on the subject; empty: every type. Without ``follow`` the
        iterator ends once it has caught up; with it, it waits for new events.

        An event is acknowledged when the caller asks for the next one, so one
        that was being handled when the caller stopped (an exception, a
        ``break``) is read again next time: at least once. Close the iterator
        (``contextlib.aclosing``) when leaving it early. Raises
        :class:`RelayUnavailable` when the stream cannot be read."""
        unknown = sorted(set(types) - set(api.EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event type(s) {', '.join(unknown)}")
        nc = self._connection()
        js = nc.jetstream()
        subjects = [api.events_subject(t) for t in sorted(set(types))]
        config = ConsumerConfig(
            durable_name=consumer,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
        )
        try:
            await self._calls(js.add_consumer, api.EVENTS_STREAM, config, timeout=self.timeout)
            subscription = await self._calls(js.pull_subscribe_bind, consumer, api.EVENTS_STREAM)
        except nats.js.errors.NotFoundError:
            raise RelayUnavailable(
                f"the {api.EVENTS_STREAM} stream does not exist "
                "(a relay with EVENTS_STREAM_ENABLED=true creates it)"
            ) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise RelayUnavailable(f"reading {api.EVENTS_STREAM} failed: {exc!r}") from None
        unread: list[Msg] = []
        try:
            while True:
                try:
                    unread = await self._calls(
                        subscription.fetch, EVENTS_BATCH, timeout=EVENTS_POLL
                    )
                except TimeoutError:  # nats-py raises its own or asyncio's: none arrived
                    if follow:
                        continue
                    info = await self._calls(subscription.consumer_info)
                    if not info.num_pending:
                        return
                    continue
                while unread:
                    msg = unread[0]
                    try:
                        event = api.EmailEvent.model_validate_json(msg.data)
                    except ValidationError:
                        await self._calls(msg.term)  # never readable: not again
                    else:
                        yield event
                        await self._calls(msg.ack)
                    unread.pop(0)
        except nats.errors.Error as exc:
            raise RelayUnavailable(f"reading {api.EVENTS_STREAM} failed: {exc!r}") from None
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                for msg in unread:  # the one in hand and any not handed out: again, now
                    await self._calls(msg.nak)
                await self._calls(subscription.unsubscribe)

    def _connection(self) -> Client:
        if self._nc is None:
            raise RuntimeError("use the client inside `async with EmailRelayClient.connect(...)`")
        return self._nc
