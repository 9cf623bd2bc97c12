"""The ``emailrelay send | status | analytics`` commands, run as real subprocesses.

Exit codes: 0 success, 1 error reply (its string on stderr), 2 usage error,
3 no relay answered (one line, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import nats.errors
import pytest
import trio

from emailrelay import api
from emailrelay.cli import build_parser, command_name, unreachable
from emailrelay.dev.engagement import DEV_EVENTS_SUBJECT
from tests.support.cli import cli_env, emailrelay
from tests.support.nats_client import SyncNats, silent_subscriber
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, running_relay
from tests.support.servers.smtp import SmtpServer, tracked_email_ids
from tests.support.waiting import LOOPBACK, free_port

SEND_FLAGS = ["--to", "someone@example.com", "--subject", "CLI test", "--text", "hi"]
SEND_FLAGS_HTML = [*SEND_FLAGS, "--html", "<p>hi</p>"]


@pytest.fixture(scope="module")
def relay(nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    with running_relay(nats_server, smtp_server) as process:
        yield process


@pytest.fixture(scope="module")
def empty_nats() -> Iterator[NatsServer]:
    """A NATS server no relay is connected to."""
    with NatsServer(jetstream=False) as server:
        yield server


def send(server: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return emailrelay("send", "--server", server, *flags)


# --- exit 0 --------------------------------------------------------------------


def test_send_prints_the_ids_and_exits_0(
    relay: RelayProcess, nats_server: NatsServer, smtp: SmtpServer
) -> None:
    done = send(nats_server.url, *SEND_FLAGS_HTML, "--group-id", "cli-send")
    assert done.returncode == 0, done.stderr
    [message] = smtp.wait_for_messages(1)
    [email_id] = tracked_email_ids([message])
    assert f"email_id={email_id}" in done.stdout
    assert "group_id=cli-send" in done.stdout


def test_send_passes_every_field_through(
    relay: RelayProcess, nats_server: NatsServer, smtp: SmtpServer
) -> None:
    done = send(
        nats_server.url,
        *SEND_FLAGS_HTML,
        "--from",
        "team@lfx.linuxfoundation.org",
        "--from-display-name",
        "The Team",
        "--reply-to",
        "help@linuxfoundation.org",
    )
    assert done.returncode == 0, done.stderr
    [message] = smtp.wait_for_messages(1)
    parsed = message.parsed
    assert parsed["From"] == "The Team <team@lfx.linuxfoundation.org>"
    assert parsed["Reply-To"] == "help@linuxfoundation.org"
    assert parsed["To"] == "someone@example.com"
    assert parsed["Subject"] == "CLI test"


def test_send_reads_the_bodies_from_files(
    relay: RelayProcess, nats_server: NatsServer, smtp: SmtpServer, tmp_path: Path
) -> None:
    (tmp_path / "body.html").write_text("<h1>From a file</h1>", encoding="utf-8")
    (tmp_path / "body.txt").write_text("Plain from a file ✓", encoding="utf-8")
    done = send(
        nats_server.url,
        "--to",
        "someone@example.com",
        "--subject",
        "Files",
        "--html-file",
        str(tmp_path / "body.html"),
        "--text-file",
        str(tmp_path / "body.txt"),
    )
    assert done.returncode == 0, done.stderr
    [message] = smtp.wait_for_messages(1)
    parsed = message.parsed
    assert parsed.get_body(("plain",)).get_content().strip() == "Plain from a file ✓"
    assert parsed.get_body(("html",)).get_content().strip() == "<h1>From a file</h1>"


def test_send_json_prints_the_reply_unchanged(relay: RelayProcess, nats_server: NatsServer) -> None:
    done = send(nats_server.url, *SEND_FLAGS_HTML, "--group-id", "cli-json", "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert set(reply) == {"email_id", "group_id"}
    assert reply["group_id"] == "cli-json"


def test_nats_url_comes_from_the_environment(relay: RelayProcess, nats_server: NatsServer) -> None:
    done = emailrelay("send", *SEND_FLAGS_HTML, "--json", env=cli_env(nats_server.url))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["email_id"]


def test_status_by_email_id_shows_the_record(relay: RelayProcess, nats_server: NatsServer) -> None:
    sent = json.loads(send(nats_server.url, *SEND_FLAGS_HTML, "--json").stdout)
    done = emailrelay("status", "--server", nats_server.url, "--email-id", sent["email_id"])
    assert done.returncode == 0, done.stderr
    assert sent["email_id"] in done.stdout
    assert "someone@example.com" in done.stdout
    assert "delivered  no" in done.stdout


def test_status_by_group_json_pages_the_group(relay: RelayProcess, nats_server: NatsServer) -> None:
    group = f"cli-{uuid.uuid4()}"
    ids = [
        json.loads(send(nats_server.url, *SEND_FLAGS_HTML, "--group-id", group, "--json").stdout)[
            "email_id"
        ]
        for _ in range(3)
    ]
    done = emailrelay(
        "status", "-s", nats_server.url, "--group-id", group, "--limit", "2", "--offset", "1"
    )
    assert done.returncode == 0, done.stderr
    assert "2 email(s)" in done.stdout
    done = emailrelay("status", "-s", nats_server.url, "--group-id", group, "--json")
    assert [record["email_id"] for record in json.loads(done.stdout)] == ids


def test_analytics_shows_the_counts(relay: RelayProcess, nats_server: NatsServer) -> None:
    group = f"cli-{uuid.uuid4()}"
    send(nats_server.url, *SEND_FLAGS_HTML, "--group-id", group)
    done = emailrelay("analytics", "-s", nats_server.url, "--group-id", group)
    assert done.returncode == 0, done.stderr
    assert "total_sent     1" in done.stdout
    done = emailrelay("analytics", "-s", nats_server.url, "--group-id", group, "--json")
    assert json.loads(done.stdout) == {
        "group_id": group,
        "total_sent": 1,
        "delivered": 0,
        "opened": 0,
        "unique_opened": 0,
        "failed": 0,
        "clicked": 0,
        "unique_clicked": 0,
    }


# --- exit 1 --------------------------------------------------------------------


def test_error_reply_exits_1_with_the_error_on_stderr(
    relay: RelayProcess, nats_server: NatsServer
) -> None:
    done = send(nats_server.url, *SEND_FLAGS_HTML, "--from", "someone@evil.example")
    assert done.returncode == 1
    assert done.stderr.startswith(f"emailrelay: {api.ERR_FROM_DOMAIN_NOT_ALLOWED} (")
    assert done.stdout == ""


def test_error_reply_with_json_prints_it_and_exits_1(
    relay: RelayProcess, nats_server: NatsServer
) -> None:
    done = emailrelay("status", "-s", nats_server.url, "--email-id", str(uuid.uuid4()), "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"error": api.ERR_NOT_FOUND}
    assert done.stderr.strip() == api.ERR_NOT_FOUND


# --- exit 2 --------------------------------------------------------------------


def test_missing_required_flag_exits_2() -> None:
    done = emailrelay("send", "--to", "someone@example.com", "--text", "hi", "--html", "x")
    assert done.returncode == 2
    assert "--subject" in done.stderr


def test_status_without_an_id_exits_2() -> None:
    assert emailrelay("status").returncode == 2


def test_paging_an_email_id_exits_2() -> None:
    done = emailrelay("status", "--email-id", "x", "--limit", "5")
    assert done.returncode == 2
    assert "--group-id" in done.stderr


def test_unreadable_body_file_exits_2(tmp_path: Path) -> None:
    done = emailrelay("send", *SEND_FLAGS, "--html-file", str(tmp_path / "missing.html"))
    assert done.returncode == 2
    assert "cannot read" in done.stderr


# --- exit 3 --------------------------------------------------------------------


def assert_one_line_without_traceback(stderr: str) -> None:
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr


def test_no_responders_exits_3(empty_nats: NatsServer) -> None:
    done = send(empty_nats.url, *SEND_FLAGS_HTML)
    assert done.returncode == 3
    assert "no relay is serving lfx.email-service.send_email" in done.stderr
    assert_one_line_without_traceback(done.stderr)


def test_unreachable_nats_exits_3() -> None:
    done = send(f"nats://{LOOPBACK}:{free_port()}", *SEND_FLAGS_HTML, "--timeout", "1")
    assert done.returncode == 3
    assert "cannot reach NATS" in done.stderr
    assert_one_line_without_traceback(done.stderr)


async def test_no_reply_before_the_timeout_exits_3(empty_nats: NatsServer) -> None:
    async with silent_subscriber(empty_nats.url, api.SEND_EMAIL_SUBJECT):
        done = await trio.to_thread.run_sync(
            lambda: send(empty_nats.url, *SEND_FLAGS_HTML, "--timeout", "0.5")
        )
    assert done.returncode == 3
    assert "no reply on lfx.email-service.send_email within 0.5s" in done.stderr
    assert_one_line_without_traceback(done.stderr)


def test_hints_name_the_command_as_it_is_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / "emailrelay"
    script.write_text("")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "send"])
    monkeypatch.setenv("PATH", str(tmp_path))
    assert command_name() == "emailrelay"


def test_hints_use_the_invoked_path_when_emailrelay_is_not_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / ".venv" / "bin" / "emailrelay"
    script.parent.mkdir(parents=True)
    script.write_text("")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "dev"])
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    assert command_name() == str(script)


def test_hints_use_python_dash_m_when_run_as_a_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/src/emailrelay/__main__.py", "send"])
    assert command_name().endswith(" -m emailrelay")


# --- help that explains -------------------------------------------------------


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its prog name, nested ones included."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser) -> None:
        found[parser.prog] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)

    walk(build_parser())
    return found


def test_every_command_is_there() -> None:
    assert set(subcommand_parsers()) == {
        "emailrelay",
        "emailrelay serve",
        "emailrelay dev",
        "emailrelay dev event",
        "emailrelay send",
        "emailrelay status",
        "emailrelay analytics",
        "emailrelay suppression",
        "emailrelay suppression list",
        "emailrelay suppression get",
        "emailrelay suppression add",
        "emailrelay suppression remove",
        "emailrelay erase",
        "emailrelay events",
    }


@pytest.mark.parametrize("prog", sorted(subcommand_parsers()))
def test_every_command_has_a_description(prog: str) -> None:
    assert subcommand_parsers()[prog].description


@pytest.mark.parametrize("prog", sorted(subcommand_parsers()))
def test_every_flag_has_help_text(prog: str) -> None:
    parser = subcommand_parsers()[prog]
    undocumented = [
        action.option_strings or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert not undocumented


def test_serve_help_lists_the_environment_and_points_to_the_readme() -> None:
    done = emailrelay("serve", "--help")
    assert done.returncode == 0
    for variable in ("NATS_URL", "PORT", "EMAIL_ENABLED", "SMTP_HOST", "SES_EVENTING_ENABLED"):
        assert f"\n  {variable} " in done.stdout
    assert "nats://localhost:4222" in done.stdout
    assert "README.md" in done.stdout


def test_send_help_says_both_bodies_are_required() -> None:
    done = emailrelay("send", "--help")
    assert "both bodies are required" in " ".join(done.stdout.split())


# --- local checks are usage errors (exit 2), nothing is sent ---------------------


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["status", "--group-id", "g", "--limit", "-1"], "--limit: must be a whole number from 1"),
        (["status", "--group-id", "g", "--limit", "0"], "--limit: must be a whole number from 1"),
        (["status", "--group-id", "g", "--limit", "1001"], "from 1 to 1000"),
        (["status", "--group-id", "g", "--offset", "-1"], "--offset: must be a whole number"),
        (["analytics", "--group-id", "g", "--timeout", "nan"], "--timeout: must be a number"),
        (["analytics", "--group-id", "g", "--timeout", "inf"], "--timeout: must be a number"),
        (["analytics", "--group-id", "g", "--timeout", "1e-9"], "--timeout: must be a number"),
        (["analytics", "--group-id", "g", "--timeout", "0"], "--timeout: must be a number"),
        (["analytics", "--group-id", "g", "-s", "http://127.0.0.1:1"], "--server must be nats://"),
        (["dev", "event", "open", "--email-id", "a b"], "--email-id: not an email id"),
    ],
)
def test_local_validation_exits_2(flags: list[str], says: str, empty_nats: NatsServer) -> None:
    done = emailrelay(*flags, env=cli_env(empty_nats.url))
    assert done.returncode == 2, done.stderr
    assert says in done.stderr


def test_a_nats_url_from_the_environment_is_checked_too() -> None:
    done = emailrelay("analytics", "--group-id", "g", env=cli_env("http://127.0.0.1:1"))
    assert done.returncode == 2
    assert "NATS_URL must be nats://" in done.stderr


# --- unreachable NATS fails fast -------------------------------------------------


def test_refused_nats_is_reported_without_waiting_for_the_timeout() -> None:
    # An hour of --timeout: only failing fast gets under the subprocess's 60 s guard.
    url = f"nats://{LOOPBACK}:{free_port()}"
    done = send(url, *SEND_FLAGS_HTML, "--timeout", "3600")
    assert done.returncode == 3
    assert f"cannot reach NATS: {LOOPBACK}:" in done.stderr
    assert "connection refused" in done.stderr
    assert_one_line_without_traceback(done.stderr)


def test_unknown_host_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_host(*args: object, **kwargs: object) -> NoReturn:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)  # no DNS leaves the machine
    problem = asyncio.run(unreachable(["nats://nats.invalid:4222"], 3600))
    assert problem == "unknown host nats.invalid"


def test_one_reachable_server_is_enough(empty_nats: NatsServer) -> None:
    refused = f"nats://{LOOPBACK}:{free_port()}"
    assert asyncio.run(unreachable([refused, empty_nats.url], 3600)) is None


def test_serve_does_not_answer_the_dev_events_subject(
    relay: RelayProcess, nats_client: SyncNats
) -> None:
    with pytest.raises(nats.errors.NoRespondersError):
        nats_client.request(DEV_EVENTS_SUBJECT, b"{}", timeout=5)
