"""The SES v2 API transport (emailrelay.mail.ses) in the sender pool, against a
local endpoint over HTTP that answers in SES's real error format and counts
requests (tests/support/servers/ses.py): what each SES answer turns into."""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import trio
from botocore.credentials import Credentials  # type: ignore[import-untyped]
from prometheus_client import REGISTRY

from emailrelay.api import TRACKING_HEADER
from emailrelay.bridge.loop import asyncio_loop as open_asyncio_loop
from emailrelay.bridge.smtp import SmtpConnection, SmtpEndpoint, provider_message_id
from emailrelay.config import SmtpTlsMode
from emailrelay.handlers.replies import encode_reply
from emailrelay.handlers.send import NoTracking, SendEmailHandler
from emailrelay.handlers.send_decision import NewIds
from emailrelay.mail import message as message_module
from emailrelay.mail.errors import (
    AmbiguousFailure,
    DailyQuotaFailure,
    PermanentFailure,
    SendFailure,
)
from emailrelay.mail.pool import Connection, SmtpPool
from emailrelay.mail.rate import AdaptiveRate, TokenBucket
from emailrelay.mail.ses import (
    SendingPaused,
    SesApi,
    SesUnavailable,
    email_tags,
    error_name,
    tag_value,
)
from tests.support.send_requests import RULES, send_request
from tests.support.servers.ses import (
    DAILY_QUOTA,
    PAUSED,
    REJECTED,
    SERVER_ERROR,
    SILENCE,
    SUSPENDED,
    THROTTLED,
    ScriptedSes,
)
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import LOOPBACK, free_port

SENDER = "noreply@lfx.linuxfoundation.org"
RECIPIENT = "jane@example.com"
EMAIL_ID = "6f1c2a34-5b6d-4e7f-8a9b-0c1d2e3f4a5b"
MESSAGE = (
    f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: t\r\n"
    f"{TRACKING_HEADER}: batch-7/{EMAIL_ID}\r\n\r\nbody\r\n"
).encode()


@pytest.fixture
def ses() -> Iterator[ScriptedSes]:
    with ScriptedSes() as server:
        yield server


def ses_api(endpoint_url: str, **options: Any) -> SesApi:
    arguments: dict[str, Any] = {
        "endpoint_url": endpoint_url,
        "region": "us-east-1",
        "credentials": Credentials("AKIDEXAMPLETESTONLY", "test-secret-not-real"),
        "configuration_set": None,
        "max_connections": 4,
        "timeout": 5.0,
    }
    return SesApi(**{**arguments, **options})


@pytest.fixture
async def api(ses: ScriptedSes) -> AsyncIterator[SesApi]:
    client = ses_api(ses.endpoint_url)
    yield client
    await client.aclose()


def make_pool(api: SesApi, **options: Any) -> SmtpPool:
    """The relay's pool over SES senders, with quick retries."""

    async def connect() -> Connection:
        return api.connection()

    arguments: dict[str, Any] = {
        "size": 4,
        "max_messages": 1000,
        "max_age": 300.0,
        "send_timeout": 5.0,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        "transport": "ses",
    }
    return SmtpPool(connect, **{**arguments, **options})


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- the request ----------------------------------------------------------------


async def test_send_email_carries_the_exact_bytes_sender_and_only_the_recipient(
    ses: ScriptedSes, api: SesApi
) -> None:
    await make_pool(api).send(SENDER, RECIPIENT, MESSAGE)

    (request,) = ses.requests
    assert request.raw == MESSAGE
    assert request.body["FromEmailAddress"] == SENDER
    assert request.body["Destination"] == {"ToAddresses": [RECIPIENT]}
    assert base64.b64decode(request.body["Content"]["Raw"]["Data"]) == MESSAGE


async def test_send_email_is_signed_for_ses_in_the_region(ses: ScriptedSes, api: SesApi) -> None:
    await make_pool(api).send(SENDER, RECIPIENT, MESSAGE)

    (request,) = ses.requests
    authorization = request.headers["Authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLETESTONLY/")
    assert "/us-east-1/ses/aws4_request" in authorization


async def test_email_id_and_group_id_go_as_email_tags(ses: ScriptedSes, api: SesApi) -> None:
    await make_pool(api).send(SENDER, RECIPIENT, MESSAGE)

    (request,) = ses.requests
    assert request.body["EmailTags"] == [
        {"Name": "email_id", "Value": EMAIL_ID},
        {"Name": "group_id", "Value": "batch-7"},
    ]


async def test_configuration_set_goes_as_configuration_set_name(ses: ScriptedSes) -> None:
    api = ses_api(ses.endpoint_url, configuration_set="lfx-events")
    await make_pool(api).send(SENDER, RECIPIENT, MESSAGE)
    await api.aclose()

    (request,) = ses.requests
    assert request.body["ConfigurationSetName"] == "lfx-events"


async def test_no_configuration_set_sends_none(ses: ScriptedSes, api: SesApi) -> None:
    await make_pool(api).send(SENDER, RECIPIENT, MESSAGE)

    assert "ConfigurationSetName" not in ses.requests[0].body


async def test_send_returns_the_message_id_ses_answered(ses: ScriptedSes, api: SesApi) -> None:
    message_id = await make_pool(api).send(SENDER, RECIPIENT, MESSAGE)

    assert message_id is not None
    assert message_id.startswith("0100")
    assert message_id.endswith("-000000")


async def test_sends_share_kept_alive_connections(ses: ScriptedSes, api: SesApi) -> None:
    pool = make_pool(api)
    for _ in range(5):
        await pool.send(SENDER, RECIPIENT, MESSAGE)

    assert ses.request_count == 5
    assert len({request.client_port for request in ses.requests}) == 1


async def test_a_proxy_in_the_environment_is_used(
    ses: ScriptedSes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HTTPS_PROXY for https:// endpoints; this endpoint is plain http, on loopback.
    monkeypatch.setenv("HTTP_PROXY", ses.endpoint_url)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    api = ses_api(f"http://127.0.0.2:{free_port()}")  # nothing listens there

    await make_pool(api).send(SENDER, RECIPIENT, MESSAGE)
    await api.aclose()

    assert ses.request_count == 1


# --- tags -----------------------------------------------------------------------


def test_a_tag_value_outside_what_ses_allows_becomes_a_hash() -> None:
    hashed = tag_value("group with spaces/ä")

    assert hashed.startswith("sha256-")
    assert len(hashed) == len("sha256-") + 64
    assert hashed == tag_value("group with spaces/ä")


def test_a_tag_value_longer_than_256_becomes_a_hash() -> None:
    assert tag_value("a" * 256) == "a" * 256
    assert tag_value("a" * 257).startswith("sha256-")


def test_a_percent_encoded_group_is_tagged_by_its_original_value() -> None:
    message = f"{TRACKING_HEADER}: caf%C3%A9/{EMAIL_ID}\r\n\r\nbody".encode()

    assert email_tags(message)[1] == {"Name": "group_id", "Value": tag_value("café")}


# --- errors by name -------------------------------------------------------------


def test_the_error_name_is_the_header_up_to_its_colon() -> None:
    headers = httpx.Headers({"x-amzn-ErrorType": "MessageRejected:http://internal.amazon.com/"})

    assert error_name(headers, {"__type": "Other"}) == "MessageRejected"


def test_without_the_header_the_error_name_is_the_body_type_or_code() -> None:
    assert error_name(httpx.Headers(), {"__type": "com.amazon#BadRequestException"}) == (
        "BadRequestException"
    )
    assert error_name(httpx.Headers(), {"code": "NotFoundException"}) == "NotFoundException"


async def test_throttling_is_retried_and_lowers_the_rate(ses: ScriptedSes, api: SesApi) -> None:
    ses.reply_next(THROTTLED)
    pacer = TokenBucket(100.0, now=trio.current_time())
    before = counter("emailrelay_smtp_throttled_total", transport="ses")

    await make_pool(api, pacer=pacer, rate=AdaptiveRate(pacer, 100.0)).send(
        SENDER, RECIPIENT, MESSAGE
    )

    assert ses.request_count == 2
    assert pacer.rate < 100.0
    assert counter("emailrelay_smtp_throttled_total", transport="ses") == before + 1


async def test_the_daily_quota_fails_at_once(ses: ScriptedSes, api: SesApi) -> None:
    ses.reply_next(DAILY_QUOTA, times=5)

    with pytest.raises(DailyQuotaFailure):
        await make_pool(api).send(SENDER, RECIPIENT, MESSAGE)
    assert ses.request_count == 1


async def test_a_rejected_message_fails_at_once_and_leaves_the_rate_alone(
    ses: ScriptedSes, api: SesApi
) -> None:
    ses.reply_next(REJECTED, times=5)
    pacer = TokenBucket(100.0, now=trio.current_time())
    started = trio.current_time()

    with pytest.raises(PermanentFailure) as failure:
        await make_pool(api, pacer=pacer, rate=AdaptiveRate(pacer, 100.0)).send(
            SENDER, RECIPIENT, MESSAGE
        )

    assert ses.request_count == 1
    assert pacer.rate == 100.0
    assert trio.current_time() - started < 1.0
    assert "MessageRejected" in failure.value.reason
    assert SENDER not in failure.value.reason  # the address SES names is redacted


@pytest.mark.parametrize("reply", [PAUSED, SUSPENDED], ids=["paused", "suspended"])
async def test_a_paused_account_fails_at_once_and_is_counted(
    ses: ScriptedSes, api: SesApi, reply: Any
) -> None:
    ses.reply_next(reply, times=5)
    before = counter("emailrelay_ses_sending_paused_total", error=reply.error)

    with pytest.raises(SendingPaused):
        await make_pool(api).send(SENDER, RECIPIENT, MESSAGE)

    assert ses.request_count == 1
    assert counter("emailrelay_ses_sending_paused_total", error=reply.error) == before + 1


async def test_a_paused_account_is_logged_once_a_minute_not_per_send(
    ses: ScriptedSes, api: SesApi, caplog: pytest.LogCaptureFixture
) -> None:
    ses.otherwise = PAUSED
    pool = make_pool(api)

    with caplog.at_level(logging.ERROR, logger="emailrelay.mail.ses"):
        for _ in range(3):
            with pytest.raises(SendingPaused):
                await pool.send(SENDER, RECIPIENT, MESSAGE)

    assert ses.request_count == 3
    assert len([r for r in caplog.records if "paused" in r.getMessage()]) == 1


async def test_a_server_error_is_retried(ses: ScriptedSes, api: SesApi) -> None:
    ses.reply_next(SERVER_ERROR, times=2)

    assert await make_pool(api).send(SENDER, RECIPIENT, MESSAGE) is not None
    assert ses.request_count == 3


async def test_an_unreachable_endpoint_is_transient_until_the_send_timeout() -> None:
    api = ses_api(f"http://{LOOPBACK}:{free_port()}")

    with pytest.raises(SendFailure) as failure:
        await make_pool(api, send_timeout=0.5).send(SENDER, RECIPIENT, MESSAGE)
    await api.aclose()

    assert not isinstance(failure.value, AmbiguousFailure)


async def test_no_answer_after_the_request_was_written_is_ambiguous_and_not_retried(
    ses: ScriptedSes,
) -> None:
    ses.reply_next(SILENCE)
    api = ses_api(ses.endpoint_url, timeout=0.5)

    with pytest.raises(AmbiguousFailure):
        await make_pool(api).send(SENDER, RECIPIENT, MESSAGE)
    await api.aclose()

    assert ses.request_count == 1


async def test_the_send_timeout_after_the_request_was_written_is_ambiguous(
    ses: ScriptedSes, api: SesApi
) -> None:
    ses.reply_next(SILENCE)

    with pytest.raises(AmbiguousFailure):
        await make_pool(api, send_timeout=0.5).send(SENDER, RECIPIENT, MESSAGE)

    assert ses.request_count == 1


# --- configuration --------------------------------------------------------------

AWS_TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLETESTONLY",
    "AWS_SECRET_ACCESS_KEY": "test-secret-not-real",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}


@pytest.fixture
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_TEST_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    return dict(AWS_TEST_ENVIRONMENT)


async def from_environment(environ: dict[str, str]) -> SesApi:
    return await SesApi.from_environment(
        configuration_set=None, max_connections=1, request_timeout=5.0, environ=environ
    )


async def test_no_region_is_a_start_up_error(aws_environment: dict[str, str]) -> None:
    with pytest.raises(SesUnavailable, match="AWS_REGION"):
        await from_environment(aws_environment)


async def test_the_endpoint_is_regional_by_default(aws_environment: dict[str, str]) -> None:
    api = await from_environment({**aws_environment, "AWS_REGION": "eu-west-1"})
    await api.aclose()

    assert api.endpoint_url == "https://email.eu-west-1.amazonaws.com"


async def test_aws_endpoint_url_sesv2_overrides_aws_endpoint_url(
    aws_environment: dict[str, str],
) -> None:
    api = await from_environment(
        {
            **aws_environment,
            "AWS_REGION": "eu-west-1",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
            "AWS_ENDPOINT_URL_SESV2": "http://127.0.0.1:2",
        }
    )
    await api.aclose()

    assert api.endpoint_url == "http://127.0.0.1:2"


async def test_aws_endpoint_url_applies_without_the_sesv2_one(
    aws_environment: dict[str, str],
) -> None:
    api = await from_environment(
        {**aws_environment, "AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    )
    await api.aclose()

    assert api.endpoint_url == "http://127.0.0.1:1"


# --- the SMTP path's message id -------------------------------------------------


def test_ses_smtp_reply_names_the_message_id() -> None:
    assert provider_message_id(
        "Ok 0100018c2a5b1e3f-5f3b1c2d-0000-4000-8000-0123456789ab-000000"
    ) == ("0100018c2a5b1e3f-5f3b1c2d-0000-4000-8000-0123456789ab-000000")


@pytest.mark.parametrize("reply", ["OK", "Ok", "2.0.0 Ok: queued as 4ABC123", "Ok id with spaces"])
def test_other_smtp_replies_name_no_message_id(reply: str) -> None:
    assert provider_message_id(reply) is None


# --- the same bytes on both transports ------------------------------------------


@pytest.fixture
async def asyncio_loop() -> AsyncIterator[None]:
    """The trio-asyncio loop aiosmtplib needs, as ``emailrelay serve`` opens it."""
    async with open_asyncio_loop():
        yield


FIXED_NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
FIXED_IDS = NewIds("11111111-2222-4333-8444-555555555555", "66666666-7777-4888-8999-aaaaaaaaaaaa")


async def send_through(sender: Any) -> None:
    handler = SendEmailHandler(
        rules=replace(RULES, configuration_set="lfx-events"),
        sender=sender,
        tracking=NoTracking(),
        new_ids=lambda: FIXED_IDS,
        now=lambda: FIXED_NOW,
    )
    request = send_request(subject="Ünïcödé " + "long " * 40, text="é" * 2000, html="<p>x</p>")
    reply = json.loads(encode_reply(await handler(json.dumps(request).encode())))
    assert reply["email_id"] == FIXED_IDS.email_id


async def test_both_transports_are_handed_the_same_bytes_for_the_same_request(
    asyncio_loop: None,
    smtp: SmtpServer,
    ses: ScriptedSes,
    api: SesApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a fixed clock and fixed ids leave random: the Message-ID and the boundary.
    monkeypatch.setattr(message_module, "make_msgid", lambda domain: f"<fixed@{domain}>")
    monkeypatch.setattr(message_module.secrets, "token_hex", lambda n: "ab" * n)
    smtp_endpoint = SmtpEndpoint(
        host=smtp.host,
        port=smtp.port,
        tls_mode=SmtpTlsMode.NONE,
        credentials=None,
        tls_context=ssl.create_default_context(),
        local_hostname="relay.test",
        timeout=5.0,
    )

    async def connect_smtp() -> Connection:
        return await SmtpConnection.open(smtp_endpoint)

    smtp_pool = SmtpPool(connect_smtp, size=1, max_messages=10, max_age=60, send_timeout=5)
    await send_through(smtp_pool)
    await smtp_pool.aclose()
    await send_through(make_pool(api))

    (over_smtp,) = smtp.messages
    (over_ses,) = ses.requests
    assert over_ses.raw == over_smtp.raw
    assert b"Date: Wed, 04 Mar 2026 05:06:07 +0000" in over_ses.raw
