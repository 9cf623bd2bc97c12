"""NATS service discovery: ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS``.

The relay answers the NATS service API (the ``micro`` protocol of the NATS
clients) for a service named ``emailrelay``, so ``nats micro ls/info/stats``
list it with its endpoints, while the contract subjects stay plain queue
subscriptions served by :mod:`emailrelay.server`. nats-py's ``nats.micro``
framework is not used for them: it awaits each handler inside the
subscription callback, one request at a time per endpoint.

The control subjects are plain subscriptions (no queue group), so every
instance answers: ``$SRV.<VERB>``, ``$SRV.<VERB>.emailrelay`` and
``$SRV.<VERB>.emailrelay.<id>``. The per-endpoint counters are fed by the
request loop through :meth:`ServiceStats.record`; only the contract's error
strings ever go into them, never exception text.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from emailrelay import __version__, api
from emailrelay.bridge.nats import IncomingRequest, NatsConnection, drain_all

log = logging.getLogger(__name__)

SERVICE_NAME = "emailrelay"
SERVICE_DESCRIPTION = "Transactional email relay: NATS request/reply in, SMTP out"
CONTROL_PREFIX = "$SRV"
VERBS = ("PING", "INFO", "STATS")

PING_RESPONSE_TYPE = "io.nats.micro.v1.ping_response"
INFO_RESPONSE_TYPE = "io.nats.micro.v1.info_response"
STATS_RESPONSE_TYPE = "io.nats.micro.v1.stats_response"

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


def error_headers(error: api.ErrorReply) -> dict[str, str]:
    """Headers for an error reply; its body stays the contract's ``{"error": ...}``."""
    return {ERROR_HEADER: error.error, ERROR_CODE_HEADER: error.service_code}


def endpoint_name(subject: str) -> str:
    """``lfx.email-service.send_email`` -> ``send_email``,
    ``lfx.email-service.suppression.get`` -> ``suppression_get`` (names allow
    no dots, and each endpoint's must be distinct)."""
    return subject.removeprefix("lfx.email-service.").replace(".", "_")


def control_subjects(service_id: str) -> list[str]:
    """Every subject an instance answers, three per verb."""
    return [
        subject
        for verb in VERBS
        for subject in (
            f"{CONTROL_PREFIX}.{verb}",
            f"{CONTROL_PREFIX}.{verb}.{SERVICE_NAME}",
            f"{CONTROL_PREFIX}.{verb}.{SERVICE_NAME}.{service_id}",
        )
    ]


@dataclass
class EndpointStats:
    name: str
    subject: str
    queue_group: str
    num_requests: int = 0
    num_errors: int = 0
    last_error: str = ""
    processing_time: int = 0
    """Nanoseconds, summed over all requests."""

    def as_info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "metadata": {},
        }

    def as_stats(self) -> dict[str, Any]:
        average = self.processing_time // self.num_requests if self.num_requests else 0
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "num_requests": self.num_requests,
            "num_errors": self.num_errors,
            "last_error": self.last_error,
            "processing_time": self.processing_time,
            "average_processing_time": average,
            "data": None,
        }


class ServiceStats:
    """This instance's identity and per-endpoint counters."""

    def __init__(
        self,
        subjects: Iterable[str],
        queue_group: str = api.QUEUE_GROUP,
        version: str = __version__,
        service_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.id = service_id or uuid.uuid4().hex
        self.metadata = metadata or {}
        self.version = version
        self.started = datetime.now(UTC)
        self.endpoints: dict[str, EndpointStats] = {
            subject: EndpointStats(endpoint_name(subject), subject, queue_group)
            for subject in subjects
        }

    def add_endpoint(self, subject: str, queue_group: str = api.QUEUE_GROUP) -> None:
        """List one more endpoint (routes added while serving)."""
        if subject not in self.endpoints:
            self.endpoints[subject] = EndpointStats(endpoint_name(subject), subject, queue_group)

    def record(self, subject: str, elapsed_ns: int, error: str | None) -> None:
        """Count one answered request; ``error`` is the contract error string, if any."""
        endpoint = self.endpoints.get(subject)
        if endpoint is None:
            return
        endpoint.num_requests += 1
        endpoint.processing_time += elapsed_ns
        if error is not None:
            endpoint.num_errors += 1
            # The NATS clients write "<code>:<description>".
            endpoint.last_error = f"{api.service_error_code(error)}:{error}"

    def _identity(self, response_type: str) -> dict[str, Any]:
        return {
            "type": response_type,
            "name": SERVICE_NAME,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata,
        }

    def ping(self) -> dict[str, Any]:
        return self._identity(PING_RESPONSE_TYPE)

    def info(self) -> dict[str, Any]:
        return {
            **self._identity(INFO_RESPONSE_TYPE),
            "description": SERVICE_DESCRIPTION,
            "endpoints": [e.as_info() for e in self.endpoints.values()],
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self._identity(STATS_RESPONSE_TYPE),
            "started": _format_started(self.started),
            "endpoints": [e.as_stats() for e in self.endpoints.values()],
        }

    def answer(self, subject: str) -> bytes:
        """The reply to a control subject (``$SRV.<VERB>[.name[.id]]``)."""
        verb = subject.split(".")[1]
        body = {"PING": self.ping, "INFO": self.info, "STATS": self.stats}[verb]()
        return json.dumps(body).encode()


def instance_metadata(email_enabled: bool) -> dict[str, str]:
    """Who this instance is (``$SRV.INFO`` metadata): where it runs, and whether
    it sends; ``emailrelay dev`` tells its own relay from others by them."""
    return {
        "hostname": socket.gethostname(),
        "pid": str(os.getpid()),
        "email_enabled": "true" if email_enabled else "false",
    }


def _format_started(started: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as nats-py's ``micro`` writes it."""
    return started.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def serve_discovery(
    nats: NatsConnection, service: ServiceStats, stopping: anyio.Event
) -> None:
    """Answer the control subjects until ``stopping`` is set; then unsubscribe
    (after draining), so a stopping instance drops out of ``$SRV.PING``."""
    send_stream, receive_stream = anyio.create_memory_object_stream[IncomingRequest](64)
    subscriptions = [
        await nats.subscribe_requests(subject, "", send_stream)
        for subject in control_subjects(service.id)
    ]
    log.info("answering NATS service discovery", extra={"service_id": service.id})
    async with anyio.create_task_group() as tg:
        tg.start_soon(_answer_all, receive_stream, service)
        await stopping.wait()
        await drain_all(subscriptions)
        send_stream.close()


async def _answer_all(
    requests: MemoryObjectReceiveStream[IncomingRequest], service: ServiceStats
) -> None:
    async with requests:
        async for request in requests:
            try:
                await request.respond(service.answer(request.subject))
            except Exception as exc:
                log.warning(
                    "discovery reply not sent",
                    extra={"subject": request.subject, "error": repr(exc)},
                )
