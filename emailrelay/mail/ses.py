"""The SES v2 API transport (``EMAIL_TRANSPORT=ses``): one ``SendEmail`` call per message.

It plays the part of an SMTP connection for :class:`~emailrelay.mail.pool.SmtpPool`,
so everything around the send is the SMTP path's: ``SMTP_POOL_SIZE`` sends at
once (and as many kept-alive HTTPS connections), ``SMTP_MAX_SEND_RATE``
pacing and its adaptive rate, retries within the deadline, ambiguity after
hand-over. httpx does the I/O directly on trio (no asyncio bridge), botocore
signs (:mod:`emailrelay.aws`); ``HTTPS_PROXY`` is honoured (httpx reads the
proxy variables).

The request: ``FromEmailAddress`` = the envelope sender, ``Destination.ToAddresses``
= [the recipient], ``Content.Raw.Data`` = the exact bytes the SMTP path sends,
``ConfigurationSetName`` = ``SES_CONFIGURATION_SET``, and ``EmailTags``
``email_id`` and ``group_id`` read back from the message's tracking header (the
source of truth; see :func:`email_tags`).

Failures are classified here, by the error's name (``x-amzn-ErrorType`` up to
its ``:``, else the body's ``__type`` or ``code``), into the classes the pool
acts on, each as the SMTP path treats its equivalent:

- ``TooManyRequestsException`` / HTTP 429: throttled, like SMTP 454 (retried
  within the deadline, the rate lowered);
- ``LimitExceededException``: the daily quota, failed at once;
- ``SendingPausedException``, ``AccountSuspendedException``: failed at once,
  counted in ``emailrelay_ses_sending_paused``, logged once a minute;
- any other 4xx (``MessageRejected``, ``MailFromDomainNotVerifiedException``,
  ``BadRequestException``, ``NotFoundException``...): permanent, no retry, no
  change to the rate;
- 5xx, a connection that could not be made, no free connection in time:
  transient, retried;
- no answer once the whole request body was written (read timeout, connection
  dropped, garbled reply): ambiguous, like a failure after DATA: SES may have
  the message, so it is never retried.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import unquote

import httpx

from emailrelay.addresses import redact_addresses_in
from emailrelay.api import TRACKING_HEADER
from emailrelay.aws.endpoints import resolve_region, service_endpoint_url
from emailrelay.aws.setup import AwsSetupError, current_credentials, load_aws_setup
from emailrelay.aws.signing import CredentialSource, sign_request
from emailrelay.mail.errors import (
    AmbiguousFailure,
    DailyQuotaFailure,
    PermanentFailure,
    SendFailure,
    TransientFailure,
)
from emailrelay.metrics import SES_SENDING_PAUSED

__all__ = [
    "SEND_EMAIL_PATH",
    "SendingPaused",
    "SesApi",
    "SesConnection",
    "SesUnavailable",
    "email_tags",
    "failure_from_response",
]

log = logging.getLogger(__name__)

SEND_EMAIL_PATH = "/v2/email/outbound-emails"
SIGNING_NAME = "ses"
"""SES v2 signs as ``ses`` (its endpoint host is ``email.<region>.amazonaws.com``)."""

PAUSED_LOG_INTERVAL = 60.0
"""A paused account fails every send: say so once a minute, not once per request."""

THROTTLING_ERRORS = frozenset({"TooManyRequestsException", "ThrottlingException", "Throttling"})
DAILY_QUOTA_ERRORS = frozenset({"LimitExceededException"})
PAUSED_ERRORS = frozenset({"SendingPausedException", "AccountSuspendedException"})

_TAG_VALUE = re.compile(r"[A-Za-z0-9_-]{1,256}")
_TRACKING_LINE = re.compile(
    rb"(?:^|\r\n)" + re.escape(TRACKING_HEADER.encode()) + rb": ([^\r\n]*)", re.IGNORECASE
)
_XML_CODE = re.compile(r"<Code>([^<]{1,128})</Code>")


class SesUnavailable(Exception):
    """``EMAIL_TRANSPORT=ses`` cannot work as configured: the message says what to set."""


class SendingPaused(PermanentFailure):
    """SES refuses every send of the account (or configuration set) until an
    operator acts: paused sending, or a suspended account (``error``)."""

    def __init__(self, reason: str, code: int | None, error: str) -> None:
        super().__init__(reason, code)
        self.error = error


@dataclass
class _Phase:
    """Set by httpx's trace hook the moment the request body is fully written:
    from then on SES may have the message."""

    body_written: bool = False


def tag_value(value: str) -> str:
    """An ``EmailTags`` value: ``value`` itself when SES allows it (at most
    256 characters of ``[A-Za-z0-9_-]``), else ``sha256-`` and its hex digest."""
    if _TAG_VALUE.fullmatch(value):
        return value
    return "sha256-" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def email_tags(message: bytes) -> list[dict[str, str]]:
    """``email_id`` and ``group_id`` as SES message tags, read from the
    message's tracking header (``<group>/<email_id>``, the group percent-
    encoded where it is not printable ASCII): the header is what SES's events
    echo and the relay matches on, the tags only help search SES's own logs.
    None for a message without the header."""
    head = message.partition(b"\r\n\r\n")[0]
    match = _TRACKING_LINE.search(head)
    if match is None:
        return []
    group, _, email_id = match.group(1).decode("ascii", "replace").rpartition("/")
    return [
        {"Name": "email_id", "Value": tag_value(email_id)},
        {"Name": "group_id", "Value": tag_value(unquote(group))},
    ]


def error_name(headers: Mapping[str, str], body: Any) -> str | None:
    """The AWS error's name: ``x-amzn-ErrorType`` up to its ``:``, else the
    body's ``__type`` (after any ``#``) or ``code``."""
    header = headers.get("x-amzn-errortype", "").partition(":")[0].strip()
    if header:
        return header
    if isinstance(body, dict):
        for key in ("__type", "code", "Code"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value.rpartition("#")[2]
    return None


def failure_from_response(response: httpx.Response) -> SendFailure:
    """The failure an SES error reply stands for (see the module docstring)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    name = error_name(response.headers, body)
    if name is None:
        # Some endpoints (moto among them) answer in the query protocol's XML.
        found = _XML_CODE.search(response.text[:4096])
        name = found.group(1) if found else None
    text = ""
    if isinstance(body, dict):
        text = str(body.get("message") or body.get("Message") or "")
    status = response.status_code
    reason = f"SES {name or 'error'} (HTTP {status})"
    if text:
        reason += ": " + redact_addresses_in(text[:300])
    if name in THROTTLING_ERRORS or status == 429:
        # Worded so emailrelay.mail.rate reads it as SMTP's 454 throttling reply.
        return TransientFailure(f"throttled: {reason}", 454)
    if name in DAILY_QUOTA_ERRORS:
        return DailyQuotaFailure(f"daily message quota exceeded: {reason}", status)
    if name in PAUSED_ERRORS:
        return SendingPaused(reason, status, name)
    if status >= 500:
        return TransientFailure(reason, status)
    return PermanentFailure(reason, status)


class SesApi:
    """The HTTPS client every pooled :class:`SesConnection` shares: one
    kept-alive connection pool of ``max_connections``."""

    def __init__(
        self,
        *,
        endpoint_url: str,
        region: str,
        credentials: CredentialSource,
        configuration_set: str | None,
        max_connections: int,
        timeout: float,
        connect_timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self.region = region
        self._url = self.endpoint_url + SEND_EMAIL_PATH
        self._credentials = credentials
        self._configuration_set = configuration_set
        # trust_env (the default): HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE.
        self._http = httpx.AsyncClient(
            transport=transport,
            verify=verify,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
        )
        self._paused_logged_at: float | None = None

    @classmethod
    async def from_environment(
        cls,
        *,
        configuration_set: str | None,
        max_connections: int,
        request_timeout: float,
        environ: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Self:
        """A client configured the way the AWS SDKs configure themselves:
        credentials from botocore's chain, the region from ``AWS_REGION``,
        ``AWS_DEFAULT_REGION`` or the profile, the endpoint from
        ``AWS_ENDPOINT_URL_SESV2`` or ``AWS_ENDPOINT_URL``, else
        ``https://email.<region>.amazonaws.com``. Raises :class:`SesUnavailable`."""
        env = os.environ if environ is None else environ
        try:
            setup = await load_aws_setup(env)
        except AwsSetupError as exc:
            raise SesUnavailable(str(exc)) from exc
        region = resolve_region(env, setup.profile_region)
        if region is None:
            raise SesUnavailable(
                "no AWS region for the SES API: set AWS_REGION (the region of the "
                "verified sending identity), or a region in the AWS profile"
            )
        return cls(
            endpoint_url=service_endpoint_url("SESV2", "email", region, env),
            region=region,
            credentials=setup.credentials,
            configuration_set=configuration_set,
            max_connections=max_connections,
            timeout=request_timeout,
            transport=transport,
            verify=setup.verify,
        )

    def connection(self) -> SesConnection:
        """A pool slot's sender: cheap, it holds no socket of its own."""
        return SesConnection(self)

    async def aclose(self) -> None:
        await self._http.aclose()

    def request_body(self, sender: str, recipient: str, message: bytes) -> bytes:
        """The ``SendEmail`` request's JSON."""
        request: dict[str, Any] = {
            "FromEmailAddress": sender,
            "Destination": {"ToAddresses": [recipient]},
            "Content": {"Raw": {"Data": base64.b64encode(message).decode("ascii")}},
        }
        tags = email_tags(message)
        if tags:
            request["EmailTags"] = tags
        if self._configuration_set:
            request["ConfigurationSetName"] = self._configuration_set
        return json.dumps(request).encode()

    async def send_email(
        self, sender: str, recipient: str, message: bytes, phase: _Phase
    ) -> str | None:
        """One signed ``SendEmail``; SES's ``MessageId``, or a :class:`SendFailure`."""
        body = self.request_body(sender, recipient, message)
        try:
            credentials = await current_credentials(self._credentials)
        except Exception as exc:
            raise TransientFailure(
                f"cannot obtain AWS credentials: {type(exc).__name__}: {exc}"
            ) from exc
        headers = sign_request(
            credentials,
            self.region,
            self._url,
            {"Content-Type": "application/json"},
            body,
            service=SIGNING_NAME,
        )

        async def trace(event: str, info: Mapping[str, Any]) -> None:
            if event.endswith("send_request_body.complete"):
                phase.body_written = True

        try:
            response = await self._http.post(
                self._url, content=body, headers=headers, extensions={"trace": trace}
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise TransientFailure(f"SES not reached: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            if phase.body_written:
                raise AmbiguousFailure(
                    f"no answer from SES after the request was sent: {type(exc).__name__}"
                ) from exc
            raise TransientFailure(
                f"connection lost before the request was sent: {type(exc).__name__}"
            ) from exc
        if response.is_success:
            return _message_id(response)
        failure = failure_from_response(response)
        if isinstance(failure, SendingPaused):
            self._note_paused(failure)
        raise failure

    def _note_paused(self, failure: SendingPaused) -> None:
        SES_SENDING_PAUSED.labels(failure.error).inc()
        now = time.monotonic()
        if self._paused_logged_at is None or now - self._paused_logged_at >= PAUSED_LOG_INTERVAL:
            self._paused_logged_at = now
            log.error(
                "ses: sending is paused or the account suspended; every send fails until "
                "it is resumed in the SES console (logged once a minute)",
                extra={"reason": failure.reason},
            )


def _message_id(response: httpx.Response) -> str | None:
    try:
        reply = response.json()
    except ValueError:
        reply = None
    message_id = reply.get("MessageId") if isinstance(reply, dict) else None
    if not isinstance(message_id, str) or not message_id:
        # Accepted all the same: the 2xx is what counts.
        log.warning("ses: SendEmail succeeded without a MessageId")
        return None
    return message_id


class SesConnection:
    """One pool slot's sender (:class:`~emailrelay.mail.pool.Connection`)."""

    def __init__(self, api: SesApi) -> None:
        self._api = api
        self._phase = _Phase()

    @property
    def data_started(self) -> bool:
        """The last :meth:`send` wrote its whole request: SES may have the message."""
        return self._phase.body_written

    async def send(self, sender: str, recipient: str, message: bytes) -> str | None:
        self._phase = phase = _Phase()
        return await self._api.send_email(sender, recipient, message, phase)

    async def close(self) -> None:
        """Nothing to close: the HTTPS connections belong to the shared client."""

    def abort(self) -> None:
        """Nothing to drop: a cancelled httpx request closes its own connection."""
