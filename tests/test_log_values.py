"""Caller values in log lines are shortened: a request may carry a megabyte
in any field, and none of it may flood the log."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from emailrelay import api
from emailrelay.addresses import redact
from emailrelay.handlers.replies import encode_reply
from emailrelay.handlers.status import GetEmailStatusHandler
from emailrelay.logs import MAX_EXTRA_CHARS, JsonFormatter, TextFormatter, shorten
from emailrelay.store.tracking import TrackingStore
from tests.support.fakes import MemoryKeyValue
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer


def test_a_short_value_is_logged_as_it_is() -> None:
    assert shorten("5b0c1a5e-7f0e-4a55-9f37-0c2a3c7f6d11") == "5b0c1a5e-7f0e-4a55-9f37-0c2a3c7f6d11"


def test_a_long_value_is_cut_and_says_how_much_was_left_out() -> None:
    assert shorten("a" * 1000, limit=10) == "aaaaaaaaaa…(+990 chars)"


def log_record(**extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"msg": "something happened", "levelname": "INFO"})
    record.__dict__.update(extra)
    return record


def test_the_json_formatter_cuts_every_string_extra() -> None:
    line = json.loads(JsonFormatter(add_source=False).format(log_record(group_id="g" * 100_000)))
    assert line["group_id"].startswith("g" * MAX_EXTRA_CHARS + "…")
    assert len(line["group_id"]) < MAX_EXTRA_CHARS + 32


def test_the_text_formatter_cuts_every_string_extra() -> None:
    line = TextFormatter(add_source=False).format(log_record(group_id="g" * 100_000))
    assert len(line) < MAX_EXTRA_CHARS + 200


def test_a_redacted_unparseable_recipient_stays_short() -> None:
    assert len(redact("jane@" + "d" * 1_000_000)) < 100


async def test_a_status_store_error_logs_shortened_ids(caplog: pytest.LogCaptureFixture) -> None:
    records, groups = MemoryKeyValue(), MemoryKeyValue()
    groups.closed = True
    handler = GetEmailStatusHandler(TrackingStore(records, groups), lambda: 1024 * 1024)
    reply = await handler(json.dumps({"group_id": "g" * 100_000}).encode())
    assert json.loads(encode_reply(reply)) == {"error": api.ERR_INTERNAL}
    (logged,) = [r for r in caplog.records if "store error" in r.getMessage()]
    assert len(logged.__dict__["group_id"]) < 100


# --- end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(smtp_server: SmtpServer) -> Iterator[tuple[RelayProcess, SyncNats]]:
    with (
        NatsServer() as server,
        SyncNats(server.url) as client,
        running_relay(server, smtp_server) as process,
    ):
        yield process, client


def test_no_log_line_carries_a_callers_whole_megabyte(
    relay: tuple[RelayProcess, SyncNats], smtp: SmtpServer
) -> None:
    process, client = relay
    group_id = "G" * api.MAX_GROUP_ID_BYTES
    assert client.request_json(api.SEND_EMAIL_SUBJECT, {**send_request(), "group_id": group_id})[
        "email_id"
    ]
    too_long = "T" * (1024 * 1024 - 200)
    client.request_json(api.SEND_EMAIL_SUBJECT, {**send_request(), "to": too_long})
    client.request_json(api.GET_EMAIL_STATUS_SUBJECT, {"email_id": too_long})
    logs = process.stderr()
    assert "email sent" in logs
    assert "G" * (MAX_EXTRA_CHARS + 1) not in logs
    assert "T" * (MAX_EXTRA_CHARS + 1) not in logs
    assert max(len(line) for line in logs.splitlines()) < 4 * MAX_EXTRA_CHARS
