"""A small long-polling SQS client over httpx, speaking the SQS JSON protocol.

It runs on whatever anyio runs on (trio or asyncio) with no bridge: httpx does
the I/O, botocore only signs requests and resolves credentials (see
:mod:`emailrelay.aws.signing`).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx

from emailrelay.aws.setup import AwsSetupError, current_credentials, load_aws_setup
from emailrelay.aws.signing import CredentialSource, FrozenCredentials, sign_request

from .endpoints import resolve_endpoint_url, resolve_region

__all__ = ["SqsClient", "SqsError", "SqsMessage"]

logger = logging.getLogger(__name__)

_CONTENT_TYPE = "application/x-amz-json-1.0"
_RECEIVE_ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp"]
_MAX_BATCH = 10
# How much longer than the long-poll wait a receive may take before it times out.
_READ_MARGIN_SECONDS = 10.0


class SqsError(Exception):
    """An SQS call failed: the endpoint was unreachable, timed out, answered
    with an AWS error or with something unreadable, or credentials could not
    be obtained.

    ``code`` is the AWS error code (``QueueDoesNotExist``,
    ``AccessDenied``...) when SQS answered with one; ``status_code`` is the
    HTTP status when there was a response. Messages never contain credentials
    or message bodies.
    """

    def __init__(
        self, message: str, *, code: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status_code = status_code


@dataclass(frozen=True, slots=True)
class SqsMessage:
    """One received message. ``receive_count`` is SQS's
    ``ApproximateReceiveCount``: 1 on first delivery, more on redelivery.
    """

    message_id: str
    receipt_handle: str = field(repr=False)
    body: str = field(repr=False)
    receive_count: int
    sent_at: datetime | None = None


class SqsClient:
    """Receives and deletes messages of one SQS queue.

    Build it with :meth:`from_environment` to get
    the AWS SDKs' usual configuration; the constructor takes everything
    explicitly. Use it as an async context manager, or call :meth:`aclose`.
    """

    def __init__(
        self,
        queue_url: str,
        *,
        region: str,
        endpoint_url: str,
        credentials: CredentialSource,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
        connect_timeout: float = 10.0,
    ) -> None:
        self.queue_url = queue_url
        self.region = region
        self.endpoint_url = endpoint_url
        self._credentials = credentials
        self._connect_timeout = connect_timeout
        self._http = httpx.AsyncClient(
            transport=transport,
            verify=verify,
            timeout=httpx.Timeout(connect_timeout, read=30.0),
        )

    @classmethod
    async def from_environment(
        cls,
        queue_url: str,
        environ: Mapping[str, str] | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Self:
        """A client configured the way the AWS SDKs configure themselves.

        Credentials come from botocore's standard chain (environment, profile,
        web identity token file as with EKS IRSA, container and instance
        metadata), which reads the process environment. The region and
        endpoint come from ``environ`` (default ``os.environ``): see
        :func:`~emailrelay.sqs.endpoints.resolve_region` and
        :func:`~emailrelay.sqs.endpoints.resolve_endpoint_url`.
        ``AWS_CA_BUNDLE`` replaces the CA certificates to trust, as in botocore.

        Raises :class:`SqsError` when no credentials or no region can be found.
        Resolving the chain reads files, so it runs in a worker thread.
        """
        env = os.environ if environ is None else environ
        try:
            setup = await load_aws_setup(env)
        except AwsSetupError as exc:
            raise SqsError(str(exc)) from exc
        region = resolve_region(queue_url, env, setup.profile_region)
        if region is None:
            raise SqsError(
                "cannot tell which AWS region the queue is in: set AWS_REGION, or use a "
                "queue URL of the form https://sqs.<region>.amazonaws.com/<account>/<queue>"
            )
        return cls(
            queue_url,
            region=region,
            endpoint_url=resolve_endpoint_url(region, env),
            credentials=setup.credentials,
            transport=transport,
            verify=setup.verify,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def receive_messages(
        self,
        max_messages: int = 10,
        wait_seconds: int = 20,
        visibility_timeout: int | None = None,
    ) -> list[SqsMessage]:
        """Long-poll for up to ``max_messages`` (1-10) messages.

        Waits up to ``wait_seconds`` (0-20) for at least one message and
        returns ``[]`` when none came. ``visibility_timeout`` overrides the
        queue's for the messages received. Raises :class:`SqsError`.
        """
        if not 1 <= max_messages <= _MAX_BATCH:
            raise ValueError(f"max_messages must be between 1 and 10, not {max_messages}")
        if not 0 <= wait_seconds <= 20:
            raise ValueError(f"wait_seconds must be between 0 and 20, not {wait_seconds}")
        request: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MaxNumberOfMessages": max_messages,
            "WaitTimeSeconds": wait_seconds,
            "MessageSystemAttributeNames": _RECEIVE_ATTRIBUTES,
            # The older name of the same parameter, for endpoints that predate it.
            "AttributeNames": _RECEIVE_ATTRIBUTES,
        }
        if visibility_timeout is not None:
            request["VisibilityTimeout"] = visibility_timeout
        reply = await self._call(
            "ReceiveMessage", request, read_timeout=wait_seconds + _READ_MARGIN_SECONDS
        )
        try:
            return [_parse_message(item) for item in reply.get("Messages") or []]
        except (KeyError, TypeError, ValueError) as exc:
            raise SqsError(f"ReceiveMessage: unreadable message in reply ({exc!r})") from None

    async def delete_messages(self, messages: Iterable[SqsMessage]) -> list[str]:
        """Delete messages, ten per ``DeleteMessageBatch`` call.

        Returns the ids of the messages SQS did not delete (they come back
        after their visibility timeout). Raises :class:`SqsError` when a batch
        call fails as a whole; batches before it stay deleted.
        """
        # One entry per receipt handle: a message passed twice is deleted once (moto
        # even rejects a batch that repeats a handle).
        by_handle: dict[str, list[SqsMessage]] = {}
        for message in messages:
            by_handle.setdefault(message.receipt_handle, []).append(message)
        handles = list(by_handle)
        failed: list[str] = []
        for start in range(0, len(handles), _MAX_BATCH):
            chunk = handles[start : start + _MAX_BATCH]
            # Entry ids need only be unique within one call: positions will do.
            entries = [
                {"Id": str(index), "ReceiptHandle": handle} for index, handle in enumerate(chunk)
            ]
            reply = await self._call(
                "DeleteMessageBatch", {"QueueUrl": self.queue_url, "Entries": entries}
            )
            deleted = {str(entry.get("Id")) for entry in reply.get("Successful") or []}
            for failure in reply.get("Failed") or []:
                logger.warning(
                    "SQS did not delete a message: %s (%s)",
                    failure.get("Code"),
                    "sender fault" if failure.get("SenderFault") else "server fault",
                )
            for index, handle in enumerate(chunk):
                if str(index) not in deleted:
                    failed.extend(message.message_id for message in by_handle[handle])
        return failed

    async def _frozen_credentials(self) -> FrozenCredentials:
        # Refreshing temporary credentials is blocking network I/O (STS, metadata).
        try:
            return await current_credentials(self._credentials)
        except Exception as exc:
            raise SqsError(f"cannot obtain AWS credentials: {type(exc).__name__}: {exc}") from exc

    async def _call(
        self, action: str, request: dict[str, Any], *, read_timeout: float = 30.0
    ) -> dict[str, Any]:
        """One signed JSON-protocol call; the decoded reply, or :class:`SqsError`."""
        body = json.dumps(request).encode()
        headers = sign_request(
            await self._frozen_credentials(),
            self.region,
            self.endpoint_url,
            {"Content-Type": _CONTENT_TYPE, "X-Amz-Target": f"AmazonSQS.{action}"},
            body,
        )
        try:
            response = await self._http.post(
                self.endpoint_url,
                content=body,
                headers=headers,
                timeout=httpx.Timeout(self._connect_timeout, read=read_timeout),
            )
        except httpx.HTTPError as exc:
            raise SqsError(
                f"{action}: no answer from {self.endpoint_url}: {type(exc).__name__}: {exc}"
            ) from exc
        if response.is_success:
            try:
                reply = response.json()
            except ValueError:
                reply = None
            if not isinstance(reply, dict):
                raise SqsError(
                    f"{action}: unreadable reply (HTTP {response.status_code})",
                    status_code=response.status_code,
                )
            return reply
        raise _error_from(action, response)


def _error_from(action: str, response: httpx.Response) -> SqsError:
    """The typed error for an SQS error reply (``__type`` and ``message``)."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        payload = {}
    # "__type" is "com.amazonaws.sqs#QueueDoesNotExist" (or the bare code).
    code = str(payload.get("__type") or "").rpartition("#")[2] or None
    if code is None:
        # The legacy query-protocol code, e.g. "AWS.SimpleQueueService.NonExistentQueue;Sender".
        code = response.headers.get("x-amzn-query-error", "").partition(";")[0] or None
    text = payload.get("message") or payload.get("Message") or response.reason_phrase
    return SqsError(
        f"{action} failed: {code or 'HTTP error'} (HTTP {response.status_code}): {text}",
        code=code,
        status_code=response.status_code,
    )


def _parse_message(item: Mapping[str, Any]) -> SqsMessage:
    attributes = item.get("Attributes") or {}
    sent = attributes.get("SentTimestamp")
    return SqsMessage(
        message_id=str(item["MessageId"]),
        receipt_handle=str(item["ReceiptHandle"]),
        body=str(item.get("Body", "")),
        receive_count=int(attributes.get("ApproximateReceiveCount", 1)),
        sent_at=datetime.fromtimestamp(int(sent) / 1000, UTC) if sent is not None else None,
    )
