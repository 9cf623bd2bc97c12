"""The first week with emailrelay: what a newcomer runs into, answered.

A relay with no NATS says its plan once and points at ``emailrelay dev``; a
relay with sending off says so and counts what it skips; an error reply keeps
its exact string on the wire and in ``--json`` while people get a hint; a
replayed send says so; a mistyped flag gets a suggestion; a closed pipe ends
a command quietly. Real relay processes against a real nats-server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from emailrelay import api
from emailrelay.cli import _show_analytics, _show_status
from emailrelay.handlers.replies import error_reply, reply_headers
from tests.support.cli import emailrelay
from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import REPO_ROOT, RelayProcess, run_relay_once, running_relay
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import LOOPBACK, free_port

SEND_FLAGS = ["--subject", "First week", "--text", "hi", "--html", "<p>hi</p>"]


@pytest.fixture(scope="module")
def relay(module_nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    env = {"SMTP_ALLOWED_FROM_DOMAINS": "lfx.linuxfoundation.org"}
    smtp_server.reset()  # a session server: no failure an earlier module set up
    with running_relay(module_nats_server, smtp_server, env) as process:
        yield process


def json_logs(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def raw_request(nats_client: SyncNats, payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A send as any NATS client makes it: the body and the headers of the reply."""

    async def go() -> tuple[bytes, dict[str, str]]:
        msg = await nats_client.nc.request(
            api.SEND_EMAIL_SUBJECT, json.dumps(payload).encode(), timeout=10
        )
        return msg.data, dict(msg.headers or {})

    return nats_client.run(go())


# --- serve with nothing configured ------------------------------------------------


def test_serve_without_nats_logs_its_plan_once_and_names_emailrelay_dev() -> None:
    url = f"nats://{LOOPBACK}:{free_port()}"
    code, _, stderr = run_relay_once({"NATS_URL": url, "NATS_CONNECT_TIMEOUT": "4"}, timeout=30)
    assert code == 1
    messages = [entry["msg"] for entry in json_logs(stderr)]
    assert [m for m in messages if m.startswith("connecting to NATS")] == [
        f"connecting to NATS at {url}; giving up after 4s (NATS_CONNECT_TIMEOUT)"
    ]
    assert len([m for m in messages if m.startswith("nats:")]) == 1, messages
    [give_up] = [m for m in messages if m.startswith("giving up")]
    assert "failed attempts" in give_up
    assert "emailrelay dev` runs NATS" in give_up


# --- sending off -------------------------------------------------------------------


def test_relay_with_sending_off_says_so_at_start_and_counts_the_skips(
    own_nats_server: NatsServer, smtp_server: SmtpServer
) -> None:
    # A server of its own: no sending relay in the queue group takes the request.
    with (
        running_relay(own_nats_server, smtp_server, {"EMAIL_ENABLED": None}) as quiet,
        SyncNats(own_nats_server.url) as nats_client,
    ):
        assert any(
            entry["level"] == "warning"
            and entry["msg"].startswith("EMAIL_ENABLED is not true: this relay sends nothing")
            for entry in json_logs(quiet.stderr())
        )
        assert quiet.metric("emailrelay_skipped_sends_total", reason="email_disabled") == 0
        body, _ = raw_request(
            nats_client, {"to": "a@example.com", "subject": "s", "text": "t", "html": "h"}
        )
        assert json.loads(body) == {"email_id": "", "group_id": ""}
        assert quiet.metric("emailrelay_skipped_sends_total", reason="email_disabled") == 1


# --- error replies: exact on the wire, a hint for people ------------------------------


def test_refused_sender_keeps_the_exact_string_on_the_wire_with_the_allowed_domains_beside(
    relay: RelayProcess, module_nats_client: SyncNats
) -> None:
    body, headers = raw_request(
        module_nats_client,
        {"to": "a@example.com", "from": "x@evil.example", "subject": "s", "text": "t", "html": "h"},
    )
    assert json.loads(body) == {"error": api.ERR_FROM_DOMAIN_NOT_ALLOWED}
    assert headers[api.ERROR_DETAIL_HEADER] == "allowed: lfx.linuxfoundation.org"


def test_cli_prints_a_refused_sender_with_its_hint(
    relay: RelayProcess, module_nats_server: NatsServer
) -> None:
    done = emailrelay(
        "send", "-s", module_nats_server.url, "--to", "a@example.com",
        "--from", "x@evil.example", *SEND_FLAGS,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"emailrelay: {api.ERR_FROM_DOMAIN_NOT_ALLOWED} (allowed: lfx.linuxfoundation.org)"
    )


def test_cli_json_keeps_the_exact_error_string(
    relay: RelayProcess, module_nats_server: NatsServer
) -> None:
    done = emailrelay(
        "send", "-s", module_nats_server.url, "--to", "a@example.com",
        "--from", "x@evil.example", *SEND_FLAGS, "--json",
    )  # fmt: skip
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"error": api.ERR_FROM_DOMAIN_NOT_ALLOWED}
    assert done.stderr.strip() == api.ERR_FROM_DOMAIN_NOT_ALLOWED


def test_cli_says_one_recipient_per_request_for_a_list(
    relay: RelayProcess, module_nats_server: NatsServer
) -> None:
    done = emailrelay(
        "send", "-s", module_nats_server.url, "--to", "a@example.com,b@example.com", *SEND_FLAGS
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"emailrelay: {api.ERR_INVALID_TO} (one recipient per request")


def test_subject_off_by_a_setting_names_the_setting(
    relay: RelayProcess, module_nats_server: NatsServer
) -> None:
    done = emailrelay("suppression", "list", "-s", module_nats_server.url)
    assert done.returncode == 3
    assert "no relay is serving lfx.email-service.suppression.list" in done.stderr
    assert "SUPPRESSION_ENABLED=true" in done.stderr


# --- a replayed send says so -----------------------------------------------------------


def test_replayed_send_carries_the_replay_header_and_the_first_body(
    relay: RelayProcess, module_nats_client: SyncNats
) -> None:
    payload = {
        "to": "a@example.com", "subject": "s", "text": "t", "html": "h",
        "idempotency_key": f"order-{uuid.uuid4()}",
    }  # fmt: skip
    first, first_headers = raw_request(module_nats_client, payload)
    again, headers = raw_request(module_nats_client, payload)
    assert api.IDEMPOTENT_REPLAY_HEADER not in first_headers
    assert headers[api.IDEMPOTENT_REPLAY_HEADER] == "true"
    assert again == first


def test_cli_says_already_sent_for_a_replayed_key_and_json_is_unchanged(
    relay: RelayProcess, module_nats_server: NatsServer
) -> None:
    key = f"order-{uuid.uuid4()}"
    flags = ["send", "-s", module_nats_server.url, "--to", "a@example.com", *SEND_FLAGS]
    first = emailrelay(*flags, "--idempotency-key", key, "--json")
    email_id = json.loads(first.stdout)["email_id"]
    again = emailrelay(*flags, "--idempotency-key", key)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"already sent (idempotency key {key}): email_id={email_id}")
    as_json = emailrelay(*flags, "--idempotency-key", key, "--json")
    assert as_json.stdout == first.stdout


# --- flags -------------------------------------------------------------------------------


def test_mistyped_flag_is_named_with_a_suggestion_on_a_short_usage() -> None:
    done = emailrelay("status", "--grup-id", "g")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    [named] = [line for line in lines if "--grup-id" in line]
    assert "(did you mean --group-id?)" in named
    assert len(lines) <= 2


def test_unknown_flag_is_reported_before_missing_required_ones() -> None:
    done = emailrelay("send", "--email", "x")
    assert done.returncode == 2
    assert "unrecognized argument --email" in done.stderr
    assert "required" not in done.stderr


# --- a closed pipe -----------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["status", "--help"], ["send", "--to"]])
def test_closed_pipe_ends_a_command_quietly(args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`| head -1`) is gone before anything is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "emailrelay", *args],
            cwd=REPO_ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr
    assert "BrokenPipeError" not in done.stderr


def test_closed_pipe_after_a_reply_exits_quietly(
    relay: RelayProcess, module_nats_server: NatsServer
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "emailrelay", "analytics", "-s", module_nats_server.url,
             "--group-id", str(uuid.uuid4()), "--json"],
            cwd=REPO_ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
            check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 128 + 13, done.stderr
    assert done.stderr == ""


# --- human output shows what --json shows --------------------------------------------------


def test_human_status_shows_a_bounce_and_a_complaint_both(
    capsys: pytest.CaptureFixture[str],
) -> None:
    record = api.TrackingRecord(
        group_id="g", email_id="e", to="a@example.com", subject="s",
        sent_at="2024-05-01T10:00:00Z", failed=True, failed_at="2024-05-01T10:01:00Z",
        bounce_type="Permanent", bounce_sub_type="General", complaint_feedback_type="abuse",
        delayed=True, delay_type="MailboxFull", ses_message_id="ses-1",
    )  # fmt: skip
    _show_status(json.loads(record.to_json()))
    out = capsys.readouterr().out
    assert "bounce: Permanent, General" in out
    assert "complaint: abuse" in out
    for shown in ("MailboxFull", "ses-1", "delay_type", "ses_message_id"):
        assert shown in out


def test_human_analytics_shows_clicks(capsys: pytest.CaptureFixture[str]) -> None:
    _show_analytics(
        {"group_id": "g", "total_sent": 2, "delivered": 2, "opened": 1, "unique_opened": 1,
         "failed": 0, "clicked": 3, "unique_clicked": 1}
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "clicked        3" in out
    assert "unique_clicked 1" in out


def test_error_detail_header_is_one_line_of_ascii_whatever_the_allowlist() -> None:
    detail = "allowed: bücher.example\r\nX-Injected: 1"
    headers = reply_headers(error_reply(api.ERR_FROM_DOMAIN_NOT_ALLOWED, detail))
    assert headers == {api.ERROR_DETAIL_HEADER: "allowed: b?cher.example??X-Injected: 1"}


def test_an_unambiguous_abbreviation_is_still_a_flag() -> None:
    done = emailrelay("status", "--grou", "g", "-s", f"nats://{LOOPBACK}:{free_port()}")
    assert done.returncode == 3, done.stderr  # parsed, then NATS refused: not a usage error
