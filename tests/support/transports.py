"""Both transports for the same end-to-end tests: ``EMAIL_TRANSPORT=smtp``
against the suite's aiosmtpd server, ``EMAIL_TRANSPORT=ses`` against moto's
SES v2 server (sender identities verified first, as on a real account).

A module's relay fixture takes the module-scoped ``transport`` fixture (smtp
unless a test asks otherwise) and adds :func:`transport_env`; a test that must
hold on both is marked :data:`on_both_transports` and reads what was
delivered from an :class:`Outbox`, whichever server received it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import boto3  # type: ignore[import-untyped]
import httpx
import pytest

from tests.support.servers.smtp import ReceivedMessage, SmtpServer, tracked_email_ids
from tests.support.servers.sqs import ACCESS_KEY_ID, SECRET_ACCESS_KEY, SqsServer
from tests.support.waiting import wait_until

TRANSPORTS = ("smtp", "ses")

on_both_transports = pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
"""Run the test once per transport (the module's ``transport`` fixture is
module-scoped, so each transport's relay starts once)."""

VERIFIED_SENDERS = ("lfx.linuxfoundation.org", "linuxfoundation.org")
"""Domains verified in moto before any send: the relay's default sender's."""


@dataclass(frozen=True)
class SesMessage:
    message_id: str
    source: str
    destinations: list[str]
    raw: bytes


class MotoSes:
    """moto's SES v2 API (the suite's moto server serves every service)."""

    def __init__(self, server: SqsServer) -> None:
        self.server = server
        self.region = server.region
        self._boto: Any = boto3.client(
            "sesv2",
            region_name=self.region,
            endpoint_url=server.endpoint_url,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )
        for identity in VERIFIED_SENDERS:
            self.verify(identity)

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url

    def verify(self, identity: str) -> None:
        """An address or domain SES may send from (moto verifies it at once)."""
        with contextlib.suppress(self._boto.exceptions.AlreadyExistsException):
            self._boto.create_email_identity(EmailIdentity=identity)

    def messages(self) -> list[SesMessage]:
        """Every message moto accepted, in order."""
        data = httpx.get(f"{self.endpoint_url}/moto-api/data.json", timeout=10).json()
        return [
            SesMessage(
                message_id=entry["id"],
                source=entry["source"],
                destinations=entry["destinations"],
                raw=entry["raw_data"].encode(),
            )
            for entry in data.get("ses", {}).get("RawMessage", [])
        ]

    def relay_env(self) -> dict[str, str | None]:
        """A relay sending through this server: dummy keys, a region, no metadata service."""
        return {
            "EMAIL_TRANSPORT": "ses",
            "AWS_ENDPOINT_URL_SESV2": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        }


def transport_env(transport: str, moto_ses: MotoSes | None) -> dict[str, str | None]:
    """What a relay's environment adds for ``transport`` (smtp: nothing)."""
    if transport == "ses":
        assert moto_ses is not None
        return moto_ses.relay_env()
    return {}


class Outbox(Protocol):
    """What a transport's server received, raw messages in order."""

    def reset(self) -> None: ...
    def messages(self) -> list[bytes]: ...
    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[bytes]: ...
    def contacts(self) -> int:
        """Connections (SMTP) or accepted SendEmail calls (moto counts no others)."""
        ...


class SmtpOutbox:
    def __init__(self, smtp: SmtpServer) -> None:
        self.smtp = smtp

    def reset(self) -> None:
        self.smtp.reset()

    def messages(self) -> list[bytes]:
        return [message.raw for message in self.smtp.messages]

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[bytes]:
        return [message.raw for message in self.smtp.wait_for_messages(count, timeout=timeout)]

    def contacts(self) -> int:
        return self.smtp.connections


class SesOutbox:
    """moto keeps every message of the session: a reset remembers how many came before."""

    def __init__(self, ses: MotoSes) -> None:
        self.ses = ses
        self._seen = len(ses.messages())

    def reset(self) -> None:
        self._seen = len(self.ses.messages())

    def messages(self) -> list[bytes]:
        return [message.raw for message in self.ses.messages()[self._seen :]]

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[bytes]:
        wait_until(lambda: len(self.messages()) >= count, timeout=timeout)
        return self.messages()

    def contacts(self) -> int:
        return len(self.messages())


def outbox_for(transport: str, smtp: SmtpServer, moto_ses: MotoSes | None) -> Outbox:
    """The transport's outbox, emptied."""
    outbox: Outbox
    if transport == "ses":
        assert moto_ses is not None
        outbox = SesOutbox(moto_ses)
    else:
        outbox = SmtpOutbox(smtp)
    outbox.reset()
    return outbox


def tracking_ids(raw_messages: list[bytes]) -> list[str]:
    """The email id in each message's tracking header (parsed once, by
    :meth:`ReceivedMessage.tracking`, whichever transport carried it)."""
    return tracked_email_ids(ReceivedMessage("", [], raw) for raw in raw_messages)
