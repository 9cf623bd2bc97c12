"""The SQS client against moto's SQS server over HTTP, plus its configuration and signing rules."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from botocore.credentials import (  # type: ignore[import-untyped]
    Credentials,
    RefreshableCredentials,
)

from emailrelay.sqs import (
    SqsClient,
    SqsError,
    SqsMessage,
    region_from_queue_url,
    resolve_endpoint_url,
    resolve_region,
)
from tests.support.servers.sqs import ACCESS_KEY_ID, SECRET_ACCESS_KEY, SqsServer
from tests.support.waiting import LOOPBACK, free_port

REGION = "us-east-1"


@asynccontextmanager
async def open_sqs_client(queue_url: str) -> AsyncIterator[SqsClient]:
    """A client configured the way the relay's is, closed on exit."""
    async with await SqsClient.from_environment(queue_url) as client:
        yield client


# Variables that would let the AWS configuration come from outside the test.
_OUTSIDE_AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)


@pytest.fixture
def aws_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqs_server: SqsServer
) -> pytest.MonkeyPatch:
    """Dummy keys, a region, moto as the SQS endpoint, and nothing that could reach outside."""
    for name in _OUTSIDE_AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", sqs_server.endpoint_url)
    return monkeypatch


@pytest.fixture
def sqs_queue(sqs_server: SqsServer) -> str:
    """A fresh queue with a 1 s visibility timeout; its URL."""
    return sqs_server.create_queue(f"events-{uuid.uuid4().hex[:12]}", visibility_timeout=1)


@pytest.fixture
async def sqs(aws_environment: pytest.MonkeyPatch, sqs_queue: str) -> AsyncIterator[SqsClient]:
    async with open_sqs_client(sqs_queue) as client:
        yield client


async def receive_at_least(sqs: SqsClient, count: int) -> list[SqsMessage]:
    """Receive until ``count`` messages came (SQS may hand out fewer than asked per call)."""
    received: list[SqsMessage] = []
    with trio.fail_after(10):
        while len(received) < count:
            received += await sqs.receive_messages(max_messages=10, wait_seconds=1)
    return received


# --- against moto over HTTP ---


async def test_receive_returns_sent_messages(
    sqs_server: SqsServer, sqs_queue: str, sqs: SqsClient
) -> None:
    sent = {sqs_server.send(sqs_queue, f'{{"n": {n}}}'): f'{{"n": {n}}}' for n in range(3)}

    received = await receive_at_least(sqs, 3)

    assert {message.message_id: message.body for message in received} == sent
    now = datetime.now(UTC)
    for message in received:
        assert message.receipt_handle
        assert message.receive_count == 1
        assert message.sent_at is not None
        assert now - timedelta(minutes=1) < message.sent_at <= now + timedelta(seconds=1)


async def test_long_poll_on_empty_queue_waits_then_returns_nothing(sqs: SqsClient) -> None:
    started = trio.current_time()
    with trio.fail_after(10):
        messages = await sqs.receive_messages(wait_seconds=1)
    assert messages == []
    assert trio.current_time() - started >= 0.9


async def test_delete_messages_empties_the_queue(
    sqs_server: SqsServer, sqs_queue: str, sqs: SqsClient
) -> None:
    # 12 messages: two DeleteMessageBatch calls (10 + 2).
    for n in range(12):
        sqs_server.send(sqs_queue, f"message {n}")
    received = await receive_at_least(sqs, 12)

    assert await sqs.delete_messages(received) == []
    assert sqs_server.queue_depth(sqs_queue) == 0
    assert await sqs.receive_messages(wait_seconds=1) == []


async def test_delete_messages_reports_what_sqs_did_not_delete(
    sqs_server: SqsServer, sqs_queue: str, sqs: SqsClient
) -> None:
    sqs_server.send(sqs_queue, "kept")
    sqs_server.send(sqs_queue, "deleted")
    received = {message.body: message for message in await receive_at_least(sqs, 2)}
    stale = SqsMessage(
        message_id=received["kept"].message_id,
        receipt_handle="not-a-receipt-handle",
        body="kept",
        receive_count=1,
    )

    failed = await sqs.delete_messages([stale, received["deleted"], received["deleted"]])

    assert failed == [received["kept"].message_id]
    assert sqs_server.queue_depth(sqs_queue) == 1


async def test_delete_nothing_makes_no_call(sqs: SqsClient) -> None:
    assert await sqs.delete_messages([]) == []


async def test_undeleted_message_is_redelivered_after_visibility_timeout(
    sqs_server: SqsServer, sqs_queue: str, sqs: SqsClient
) -> None:
    message_id = sqs_server.send(sqs_queue, "try again")
    [first] = await receive_at_least(sqs, 1)

    [second] = await receive_at_least(sqs, 1)

    assert (first.message_id, first.receive_count) == (message_id, 1)
    assert (second.message_id, second.receive_count) == (message_id, 2)
    assert second.receipt_handle != first.receipt_handle


async def test_visibility_timeout_override_hides_the_message_longer(
    sqs_server: SqsServer, sqs_queue: str, sqs: SqsClient
) -> None:
    sqs_server.send(sqs_queue, "hidden")
    with trio.fail_after(10):
        received = await sqs.receive_messages(wait_seconds=1, visibility_timeout=30)
    assert len(received) == 1
    # The queue's own timeout is 1 s: without the override it would be back by now.
    assert await sqs.receive_messages(wait_seconds=2) == []


async def test_unknown_queue_raises_with_the_aws_error_code(
    aws_environment: pytest.MonkeyPatch, sqs_server: SqsServer
) -> None:
    async with open_sqs_client(f"{sqs_server.endpoint_url}/123456789012/no-such-queue") as sqs:
        with pytest.raises(SqsError) as caught:
            await sqs.receive_messages(wait_seconds=0)
    assert caught.value.code == "QueueDoesNotExist"
    assert caught.value.status_code == 400
    assert "QueueDoesNotExist" in str(caught.value)


async def test_unreachable_endpoint_raises_sqs_error_quickly(
    aws_environment: pytest.MonkeyPatch, sqs_queue: str
) -> None:
    closed = f"http://{LOOPBACK}:{free_port()}"
    aws_environment.setenv("AWS_ENDPOINT_URL_SQS", closed)
    async with open_sqs_client(sqs_queue) as sqs:
        with trio.fail_after(5), pytest.raises(SqsError) as caught:
            await sqs.receive_messages(wait_seconds=20)
    assert caught.value.code is None
    assert closed in str(caught.value)


async def test_missing_credentials_fail_at_start(aws_environment: pytest.MonkeyPatch) -> None:
    aws_environment.delenv("AWS_ACCESS_KEY_ID")
    aws_environment.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(SqsError, match="no AWS credentials found"):
        await SqsClient.from_environment("https://sqs.us-east-1.amazonaws.com/1/q")


async def test_unknown_region_fails_at_start(aws_environment: pytest.MonkeyPatch) -> None:
    aws_environment.delenv("AWS_REGION")
    with pytest.raises(SqsError, match="AWS_REGION"):
        await SqsClient.from_environment("http://localhost:4566/000000000000/q")


async def test_profile_supplies_credentials_and_region(
    aws_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    aws_environment.delenv("AWS_ACCESS_KEY_ID")
    aws_environment.delenv("AWS_SECRET_ACCESS_KEY")
    aws_environment.delenv("AWS_REGION")
    aws_environment.delenv("AWS_ENDPOINT_URL_SQS")
    aws_environment.setenv("AWS_PROFILE", "relay")
    (tmp_path / "aws-config").write_text("[profile relay]\nregion = eu-west-3\n")
    (tmp_path / "aws-credentials").write_text(
        "[relay]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = profile-secret\n"
    )
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={})

    client = await SqsClient.from_environment(
        "https://sqs.eu-west-3.amazonaws.com/1/q", transport=httpx.MockTransport(answer)
    )
    async with client:
        assert await client.receive_messages(wait_seconds=0) == []

    assert (client.region, client.endpoint_url) == (
        "eu-west-3",
        "https://sqs.eu-west-3.amazonaws.com",
    )
    [request] = requests
    assert (request.url.host, request.url.raw_path) == ("sqs.eu-west-3.amazonaws.com", b"/")
    assert "Credential=AKIDPROFILE/" in request.headers["Authorization"]


# --- signing, checked by recomputing SigV4 independently ---


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def expected_signature(request: httpx.Request, secret_key: str, signed_headers: list[str]) -> str:
    """SigV4 from the request exactly as it went on the wire (the AWS documentation's recipe)."""
    amz_date = request.headers["X-Amz-Date"]
    scope_date, region, service = amz_date[:8], *_scope(request)[1:3]
    canonical_request = "\n".join(
        [
            request.method,
            request.url.raw_path.decode().partition("?")[0] or "/",
            request.url.query.decode(),
            "".join(f"{name}:{request.headers[name].strip()}\n" for name in signed_headers),
            ";".join(signed_headers),
            hashlib.sha256(request.content).hexdigest(),
        ]
    )
    scope = f"{scope_date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{secret_key}".encode()
    for part in (scope_date, region, service, "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def _authorization(request: httpx.Request) -> dict[str, str]:
    algorithm, _, fields = request.headers["Authorization"].partition(" ")
    assert algorithm == "AWS4-HMAC-SHA256"
    return dict(field.strip().split("=", 1) for field in fields.split(","))


def _scope(request: httpx.Request) -> list[str]:
    """[access key, region, service, date] from the credential scope."""
    access_key, date, region, service, terminator = _authorization(request)["Credential"].split("/")
    assert terminator == "aws4_request"
    return [access_key, region, service, date]


def capture_requests(
    reply: dict[str, Any] | None = None,
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=reply if reply is not None else {})

    return httpx.MockTransport(answer), requests


async def test_requests_carry_a_valid_sigv4_signature_for_sqs_in_the_configured_region() -> None:
    transport, requests = capture_requests({"Messages": []})
    queue_url = "https://sqs.eu-central-1.amazonaws.com/123456789012/events"
    credentials = Credentials("AKIDSIGNINGTEST", "signing-secret", "session-token-value")
    async with SqsClient(
        queue_url,
        region="eu-central-1",
        endpoint_url="https://sqs.eu-central-1.amazonaws.com",
        credentials=credentials,
        transport=transport,
    ) as sqs:
        await sqs.receive_messages(max_messages=5, wait_seconds=3)

    [request] = requests
    access_key, region, service, date = _scope(request)
    assert (access_key, region, service) == ("AKIDSIGNINGTEST", "eu-central-1", "sqs")
    assert date == request.headers["X-Amz-Date"][:8]
    signed = _authorization(request)["SignedHeaders"].split(";")
    assert {"host", "x-amz-date", "x-amz-target", "content-type", "x-amz-security-token"} <= set(
        signed
    )
    assert request.headers["X-Amz-Security-Token"] == "session-token-value"
    assert _authorization(request)["Signature"] == expected_signature(
        request, "signing-secret", signed
    )
    # The check can fail: another secret or another body gives another signature.
    assert _authorization(request)["Signature"] != expected_signature(request, "other", signed)

    assert request.headers["X-Amz-Target"] == "AmazonSQS.ReceiveMessage"
    assert request.headers["Content-Type"] == "application/x-amz-json-1.0"
    body = json.loads(request.content)
    assert body["QueueUrl"] == queue_url
    assert (body["MaxNumberOfMessages"], body["WaitTimeSeconds"]) == (5, 3)
    assert set(body["MessageSystemAttributeNames"]) == {"ApproximateReceiveCount", "SentTimestamp"}


async def test_expiring_credentials_are_refreshed_in_a_worker_thread() -> None:
    refreshed_in: list[int] = []

    def refresh() -> dict[str, str]:
        refreshed_in.append(threading.get_ident())
        return {
            "access_key": "AKIDREFRESHED",
            "secret_key": "refreshed-secret",
            "token": "refreshed-token",
            "expiry_time": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        }

    # Five minutes left: inside botocore's mandatory refresh window (10 minutes).
    credentials = RefreshableCredentials(
        "AKIDEXPIRING",
        "expiring-secret",
        "expiring-token",
        datetime.now(UTC) + timedelta(minutes=5),
        refresh,
        "test",
    )
    transport, requests = capture_requests()
    async with SqsClient(
        "https://sqs.us-west-2.amazonaws.com/1/q",
        region="us-west-2",
        endpoint_url="https://sqs.us-west-2.amazonaws.com",
        credentials=credentials,
        transport=transport,
    ) as sqs:
        await sqs.receive_messages(wait_seconds=0)
        await sqs.receive_messages(wait_seconds=0)

    assert len(refreshed_in) == 1
    assert refreshed_in[0] != threading.get_ident()
    for request in requests:
        assert _scope(request)[0] == "AKIDREFRESHED"
        signed = _authorization(request)["SignedHeaders"].split(";")
        assert _authorization(request)["Signature"] == expected_signature(
            request, "refreshed-secret", signed
        )


# --- error replies and failures, through a stand-in transport ---


def sqs_with(transport: httpx.AsyncBaseTransport, credentials: Any = None) -> SqsClient:
    return SqsClient(
        "https://sqs.us-east-1.amazonaws.com/1/q",
        region="us-east-1",
        endpoint_url="https://sqs.us-east-1.amazonaws.com",
        credentials=credentials or Credentials("AKIDERRORS", "errors-secret"),
        transport=transport,
    )


async def test_server_error_is_an_sqs_error_with_its_code() -> None:
    reply = {"__type": "com.amazonaws.sqs#InternalError", "message": "try later"}
    transport = httpx.MockTransport(lambda request: httpx.Response(500, json=reply))
    async with sqs_with(transport) as sqs:
        with pytest.raises(SqsError) as caught:
            await sqs.receive_messages(wait_seconds=0)
    assert (caught.value.code, caught.value.status_code) == ("InternalError", 500)
    assert "try later" in str(caught.value)
    assert "errors-secret" not in str(caught.value)


async def test_unreadable_error_reply_is_an_sqs_error() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(503, text="<html>busy</html>"))
    async with sqs_with(transport) as sqs:
        with pytest.raises(SqsError) as caught:
            await sqs.delete_messages([SqsMessage("id", "handle", "body", 1)])
    assert (caught.value.code, caught.value.status_code) == (None, 503)


async def test_credentials_that_cannot_be_refreshed_are_an_sqs_error() -> None:
    class Broken:
        def get_frozen_credentials(self) -> Any:
            raise RuntimeError("token endpoint down")

    transport, requests = capture_requests()
    async with sqs_with(transport, Broken()) as sqs:
        with pytest.raises(SqsError, match="cannot obtain AWS credentials"):
            await sqs.receive_messages(wait_seconds=0)
    assert requests == []


def test_message_repr_shows_neither_body_nor_receipt_handle() -> None:
    message = SqsMessage("id-1", "secret-handle", '{"mail": "private"}', 1)
    assert "private" not in repr(message)
    assert "secret-handle" not in repr(message)
    assert "id-1" in repr(message)


# --- region and endpoint rules ---


@pytest.mark.parametrize(
    ("environ", "configured", "expected"),
    [
        ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-2"}, "eu-west-3", "eu-west-1"),
        ({"AWS_DEFAULT_REGION": "eu-west-2"}, "eu-west-3", "eu-west-2"),
        ({"AWS_REGION": "", "AWS_DEFAULT_REGION": " "}, "eu-west-3", "eu-west-3"),
        ({}, None, "ap-south-1"),
    ],
)
def test_region_comes_from_environment_then_profile_then_queue_url(
    environ: dict[str, str], configured: str | None, expected: str
) -> None:
    url = "https://sqs.ap-south-1.amazonaws.com/123456789012/events"
    assert resolve_region(url, environ, configured) == expected


@pytest.mark.parametrize(
    ("queue_url", "region"),
    [
        ("https://sqs.us-east-2.amazonaws.com/123456789012/q", "us-east-2"),
        ("https://SQS.EU-NORTH-1.AMAZONAWS.COM/123456789012/q", "eu-north-1"),
        ("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q", "cn-north-1"),
        ("https://eu-west-1.queue.amazonaws.com/123456789012/q", "eu-west-1"),
        ("http://localhost:4566/000000000000/q", None),
        ("https://sqs.us-east-1.amazonaws.com.evil.example/1/q", None),
        ("not a url", None),
    ],
)
def test_region_from_queue_url(queue_url: str, region: str | None) -> None:
    assert region_from_queue_url(queue_url) == region


def test_no_region_anywhere_is_none() -> None:
    assert resolve_region("http://127.0.0.1:4566/000000000000/q", {}) is None


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:1", "AWS_ENDPOINT_URL": "http://x:2"},
            "http://127.0.0.1:1",
        ),
        ({"AWS_ENDPOINT_URL_SQS": "", "AWS_ENDPOINT_URL": "http://x:2"}, "http://x:2"),
        ({}, "https://sqs.eu-west-1.amazonaws.com"),
        (
            {
                "AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:1",
                "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true",
            },
            "https://sqs.eu-west-1.amazonaws.com",
        ),
    ],
)
def test_endpoint_override_rules(environ: dict[str, str], expected: str) -> None:
    assert resolve_endpoint_url("eu-west-1", environ) == expected


def test_china_regions_use_the_china_domain() -> None:
    assert (
        resolve_endpoint_url("cn-northwest-1", {}) == "https://sqs.cn-northwest-1.amazonaws.com.cn"
    )
