"""``emailrelay dev``: the whole stack as one subprocess, and its SMTP capture."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from emailrelay import api
from emailrelay.dev.capture import CapturedMessage, CaptureServer
from emailrelay.dev.natsserver import nats_server_binary
from tests.support.cli import emailrelay
from tests.support.servers.dev import DevStack, children_of, is_running
from tests.support.servers.relay import RelayProcess
from tests.support.waiting import LOOPBACK, wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc for child processes")


@pytest.fixture
def dev_stack(tmp_path: Path) -> Iterator[DevStack]:
    stack = DevStack(tmp_path / "state", tmp_path)
    try:
        yield stack
    finally:
        stack.kill()


def send_first_email(stack: DevStack) -> str:
    done = emailrelay(
        "send",
        "--server",
        stack.nats_url,
        "--to",
        "newcomer@example.com",
        "--subject",
        "Hello from dev",
        "--text",
        "It works.",
        "--html",
        "<p>It works.</p>",
        "--json",
    )
    assert done.returncode == 0, f"{done.stderr}\n{stack.logs()}"
    email_id: str = json.loads(done.stdout)["email_id"]
    return email_id


def test_dev_stack_sends_captures_tracks_and_stops_cleanly_on_ctrl_c(
    dev_stack: DevStack,
) -> None:
    out = dev_stack.stdout()
    assert f"NATS             {dev_stack.nats_url}" in out
    assert re.search(r"SMTP capture     smtp://127\.0\.0\.1:\d+", out)
    assert re.search(r"relay health     http://127\.0\.0\.1:\d+/livez", out)
    assert re.search(r"relay metrics    http://127\.0\.0\.1:\d+/metrics", out)
    assert re.search(r"\n  inbox            http://127\.0\.0\.1:\d+/\n", out)
    assert "email-recipients, email-group-index" in out

    email_id = send_first_email(dev_stack)

    capture = dev_stack.state_dir / "capture"
    wait_until(lambda: list(capture.glob(f"*{email_id}.eml")), message="no .eml captured")
    [eml] = capture.glob(f"*{email_id}.eml")
    assert b"Subject: Hello from dev" in eml.read_bytes()
    wait_until(lambda: f"/{email_id}" in dev_stack.stdout(), message="no summary line")
    summary = next(line for line in dev_stack.stdout().splitlines() if f"/{email_id}" in line)
    assert "To: newcomer@example.com" in summary
    assert "Subject: Hello from dev" in summary

    status = emailrelay("status", "--server", dev_stack.nats_url, "--email-id", email_id)
    assert status.returncode == 0, status.stderr
    assert email_id in status.stdout
    assert "newcomer@example.com" in status.stdout

    children = children_of(dev_stack.process.pid)
    nats_servers = [
        pid for pid in children if "nats-server" in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    assert nats_servers, "the embedded nats-server is not a child of emailrelay dev"

    assert dev_stack.interrupt() == 0, dev_stack.logs()
    assert not [pid for pid in children if is_running(pid)], "child processes left behind"
    assert "emailrelay dev: stopped" in dev_stack.stdout()


def test_dev_stack_on_the_ses_transport_captures_and_records_the_message_id(
    tmp_path: Path,
) -> None:
    stack = DevStack(tmp_path / "state", tmp_path, extra_args=("--transport", "ses"))
    try:
        assert re.search(r"sends through the SES API at http://127\.0\.0\.1:\d+", stack.stdout())
        email_id = send_first_email(stack)

        capture = stack.state_dir / "capture"
        wait_until(lambda: list(capture.glob(f"*{email_id}.eml")), message="no .eml captured")
        status = emailrelay("status", "--server", stack.nats_url, "--email-id", email_id, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["ses_message_id"]
        assert stack.interrupt() == 0, stack.logs()
    finally:
        stack.kill()


def test_dev_stack_keeps_tracking_data_across_restarts(tmp_path: Path) -> None:
    first = DevStack(tmp_path / "state", tmp_path)
    try:
        email_id = send_first_email(first)
        assert first.interrupt() == 0, first.logs()
    finally:
        first.kill()

    second = DevStack(tmp_path / "state", tmp_path)
    try:
        status = emailrelay("status", "--server", second.nats_url, "--email-id", email_id)
        assert status.returncode == 0, f"{status.stderr}\n{second.logs()}"
        assert email_id in status.stdout
        assert second.interrupt() == 0, second.logs()
    finally:
        second.kill()


def test_nats_server_binary_comes_from_the_wheel() -> None:
    binary = nats_server_binary()
    assert binary.name == "nats-server"
    assert os.access(binary, os.X_OK)


def test_capture_server_keeps_each_message_as_an_eml_file(tmp_path: Path) -> None:
    captured: list[CapturedMessage] = []
    message = EmailMessage()
    message["From"] = "Sender <sender@example.com>"
    message["To"] = "rcpt@example.com"
    message["Subject"] = "Captured"
    message["X-LFX-TRACKING-ID"] = "group-1/3f0c2a8e-0000-4000-8000-000000000001"
    message.set_content("body line\n")
    raw = message.as_bytes().replace(b"\n", b"\r\n")

    with CaptureServer(tmp_path / "capture", 0, captured.append) as server:
        assert server.port != 0
        with smtplib.SMTP(LOOPBACK, server.port, timeout=10) as client:
            client.sendmail("sender@example.com", ["rcpt@example.com"], raw)

    [eml] = (tmp_path / "capture").glob("*.eml")
    assert eml.name.endswith("-3f0c2a8e-0000-4000-8000-000000000001.eml")
    assert eml.read_bytes() == raw
    [summary] = captured
    assert summary.summary().startswith(
        "captured  From: Sender <sender@example.com>  To: rcpt@example.com  Subject: Captured  "
        "tracking: group-1/3f0c2a8e-0000-4000-8000-000000000001"
    )


# --- Nothing stranded, whatever ends the stack ----------------------------------


def test_sighup_to_the_stacks_process_group_leaves_no_process(tmp_path: Path) -> None:
    """Closing the terminal (SIGHUP to the foreground group) stops the whole stack."""
    stack = DevStack(tmp_path / "state", tmp_path)
    try:
        children = children_of(stack.process.pid)
        assert stack.nats_server_pids(), "no nats-server child to watch"
        os.killpg(stack.process.pid, signal.SIGHUP)
        assert stack.process.wait(timeout=30) == 0, stack.logs()
        wait_until(
            lambda: not [pid for pid in children if is_running(pid)],
            message="a child of emailrelay dev outlived SIGHUP",
        )
    finally:
        stack.kill()


def test_nats_server_stops_when_the_stack_is_killed_outright(tmp_path: Path) -> None:
    """SIGKILL cannot be handled: the kernel's parent-death signal stops nats-server."""
    stack = DevStack(tmp_path / "state", tmp_path)
    try:
        nats_servers = stack.nats_server_pids()
        assert nats_servers
        stack.kill()
        wait_until(
            lambda: not [pid for pid in nats_servers if is_running(pid)],
            timeout=20,
            message="nats-server outlived a SIGKILLed emailrelay dev",
        )
    finally:
        stack.kill()


# --- Start-up conflicts, one line each ----------------------------------------


ANY_PORTS = {
    "--nats-port": "0",
    "--smtp-port": "0",
    "--port": "0",
    "--nats-monitoring-port": "0",
    "--inbox-port": "0",
}


@pytest.mark.parametrize("flag", list(ANY_PORTS))
def test_taken_port_is_one_line_naming_the_flag(flag: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {**ANY_PORTS, flag: port}
        done = emailrelay(
            "dev", *(a for pair in ports.items() for a in pair), "--state-dir", str(tmp_path)
        )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert f"port {port} is already in use on 127.0.0.1: set {flag} to a free port" in line
    assert not (tmp_path / "nats").exists(), "nats-server was started anyway"


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """One stack on ``--nats-port 0``, found through its state dir as a user would."""
    directory = tmp_path_factory.mktemp("shared-dev")
    stack = DevStack(directory / "state", directory, nats_port=0)
    try:
        yield stack
    finally:
        stack.kill()


def test_second_stack_on_one_state_dir_exits_2_naming_the_first(shared_stack: DevStack) -> None:
    done = emailrelay(
        "dev", *(a for pair in ANY_PORTS.items() for a in pair),
        "--state-dir", str(shared_stack.state_dir),
    )  # fmt: skip
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert f"another emailrelay dev (PID {shared_stack.process.pid}) is using" in line
    assert len(shared_stack.nats_server_pids()) == 1
    assert shared_stack.process.poll() is None


# --- Engagement events on a laptop --------------------------------------------


def cli(stack: DevStack, *args: str) -> subprocess.CompletedProcess[str]:
    done = emailrelay(*args)
    assert done.returncode == 0, f"{args}: {done.stderr}\n{stack.logs()}"
    return done


def test_events_move_status_and_analytics_on_a_laptop(shared_stack: DevStack) -> None:
    group = f"dev-{uuid.uuid4()}"
    server = ("--server", shared_stack.nats_url)
    sent = cli(
        shared_stack, "send", *server, "--to", "newcomer@example.com", "--subject", "Events",
        "--text", "t", "--html", "<p>t</p>", "--group-id", group, "--json",
    )  # fmt: skip
    email_id = json.loads(sent.stdout)["email_id"]

    def delivered() -> bool:
        return (
            "delivered  yes" in cli(shared_stack, "status", *server, "--email-id", email_id).stdout
        )

    wait_until(delivered, timeout=20, message="no Delivery event after capture")

    state = ("--state-dir", str(shared_stack.state_dir))
    opened = cli(shared_stack, "dev", "event", "open", "--email-id", email_id, *state)
    assert "open event for" in opened.stdout
    assert "opened     1 time(s)" in opened.stdout
    clicked = cli(shared_stack, "dev", "event", "click", "--email-id", email_id, *state)
    assert "clicked    1 time(s)" in clicked.stdout

    status = cli(shared_stack, "status", *server, "--email-id", email_id, "--json")
    record = json.loads(status.stdout)
    assert (record["delivered"], record["open_count"], record["click_count"]) == (True, 1, 1)
    assert record["clicked_links"][0]["link"] == "https://example.com/"
    analytics = cli(shared_stack, "analytics", *server, "--group-id", group, "--json")
    assert json.loads(analytics.stdout) == {
        "group_id": group,
        "total_sent": 1,
        "delivered": 1,
        "opened": 1,
        "unique_opened": 1,
        "failed": 0,
        "clicked": 1,
        "unique_clicked": 1,
    }


def test_event_for_an_email_the_stack_never_captured_exits_1(shared_stack: DevStack) -> None:
    done = emailrelay(
        "dev", "event", "open", "--email-id", str(uuid.uuid4()),
        "--state-dir", str(shared_stack.state_dir),
    )  # fmt: skip
    assert done.returncode == 1
    assert "events are for emails this dev stack captured" in done.stderr


def test_event_without_a_running_stack_exits_3(tmp_path: Path) -> None:
    done = emailrelay("dev", "event", "open", "--email-id", "x", "--state-dir", str(tmp_path))
    assert done.returncode == 3
    [line] = done.stderr.strip().splitlines()
    assert f"no emailrelay dev has run in {tmp_path}" in line


def test_second_stack_reports_every_taken_port_at_once(tmp_path: Path) -> None:
    with socket.socket() as nats_taken, socket.socket() as smtp_taken:
        for taken in (nats_taken, smtp_taken):
            taken.bind((LOOPBACK, 0))
            taken.listen()
        nats_port, smtp_port = (str(s.getsockname()[1]) for s in (nats_taken, smtp_taken))
        ports = {**ANY_PORTS, "--nats-port": nats_port, "--smtp-port": smtp_port}
        done = emailrelay(
            "dev", *(a for pair in ports.items() for a in pair), "--state-dir", str(tmp_path)
        )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert f"port {nats_port} is already in use" in lines[0]
    assert "--nats-port" in lines[0]
    assert f"port {smtp_port} is already in use" in lines[1]
    assert "--smtp-port" in lines[1]


def test_dev_bounce_suppresses_and_the_next_send_answers_recipient_suppressed(
    shared_stack: DevStack,
) -> None:
    """The dev event path is production's: a Permanent bounce reaches the
    suppression list (on by default in dev), and the next send is refused."""
    server = ("--server", shared_stack.nats_url)
    address = f"bounce-{uuid.uuid4().hex[:8]}@example.com"
    message = ("--to", address, "--subject", "Bounce", "--text", "t", "--html", "<p>t</p>")
    sent = cli(shared_stack, "send", *server, *message, "--json")
    email_id = json.loads(sent.stdout)["email_id"]
    capture = shared_stack.state_dir / "capture"
    wait_until(lambda: list(capture.glob(f"*{email_id}.eml")), message="no .eml captured")

    state = ("--state-dir", str(shared_stack.state_dir))
    bounced = cli(shared_stack, "dev", "event", "bounce", "--email-id", email_id, *state)
    assert "applied by the relay" in bounced.stdout

    listed = cli(shared_stack, "suppression", "get", *server, address, "--json")
    assert json.loads(listed.stdout)["reason"] == "bounce"
    again = emailrelay("send", *server, *message)
    assert again.returncode == 1
    assert api.ERR_RECIPIENT_SUPPRESSED in again.stderr


def test_dev_event_finds_the_stack_from_another_directory(
    shared_stack: DevStack, tmp_path: Path
) -> None:
    server = ("--server", shared_stack.nats_url)
    sent = cli(
        shared_stack, "send", *server, "--to", "elsewhere@example.com", "--subject", "Anywhere",
        "--text", "t", "--html", "<p>t</p>", "--json",
    )  # fmt: skip
    email_id = json.loads(sent.stdout)["email_id"]
    capture = shared_stack.state_dir / "capture"
    wait_until(lambda: list(capture.glob(f"*{email_id}.eml")), message="no .eml captured")
    done = subprocess.run(
        [sys.executable, "-m", "emailrelay", "dev", "event", "open", "--email-id", email_id],
        cwd=tmp_path,  # no state dir here: the stack is found through NATS
        env={**os.environ, "NATS_URL": shared_stack.nats_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{done.stderr}\n{shared_stack.logs()}"
    assert "open event for" in done.stdout
    assert "opened     1 time(s)" in done.stdout


def test_dev_banner_lists_every_bucket_the_relay_opens(shared_stack: DevStack) -> None:
    out = shared_stack.stdout()
    assert (
        "KV buckets       email-recipients, email-group-index, email-idempotency, "
        "email-suppressions" in out
    )
    assert "polling the dev event queue for SES events" in shared_stack.logs()
    assert "polling SQS" not in shared_stack.logs()


def test_dev_warns_when_another_relay_answers_in_its_queue_group(
    shared_stack: DevStack,
) -> None:
    with RelayProcess({"NATS_URL": shared_stack.nats_url, "EMAIL_ENABLED": None}) as other:
        other.wait_ready()
        wait_until(
            lambda: "another relay" in shared_stack.stderr_path.read_text(),
            timeout=20,
            message=f"no warning about the other relay\n{shared_stack.logs()}",
        )
    [warning] = [
        line
        for line in shared_stack.stderr_path.read_text().splitlines()
        if "another relay" in line
    ]
    assert f"PID {other.pid}" in warning
    assert "lfx.email-service.queue" in warning
    assert "EMAIL_ENABLED is not true" in warning


def test_erasure_deletes_the_recipients_captured_messages(shared_stack: DevStack) -> None:
    server = ("--server", shared_stack.nats_url)
    target = f"forget-{uuid.uuid4().hex[:8]}@example.com"
    for to in (f"Forget Me <{target}>", "keep@example.com"):
        cli(
            shared_stack, "send", *server, "--to", to, "--subject", "Erase",
            "--text", "t", "--html", "<p>t</p>",
        )  # fmt: skip
    capture = shared_stack.state_dir / "capture"

    def addressed_to(address: str) -> list[Path]:
        return [p for p in capture.glob("*.eml") if address in p.read_text(errors="replace")]

    wait_until(lambda: addressed_to(target), timeout=20, message="the email was not captured")
    kept = addressed_to("keep@example.com")
    erased = cli(shared_stack, "erase", "--recipient", target.upper(), *server, "--json")
    assert json.loads(erased.stdout)["erased_records"] == 1
    assert addressed_to(target) == []
    assert all(path.exists() for path in kept)


def test_dev_stack_publishes_events_to_the_stream(shared_stack: DevStack) -> None:
    server = ("--server", shared_stack.nats_url)
    email_id = send_first_email(shared_stack)
    consumer = ("--consumer", f"dev-test-{uuid.uuid4().hex[:8]}")
    seen: list[str] = []

    def sent_and_delivered() -> bool:
        done = cli(shared_stack, "events", *server, *consumer, "--json")
        seen.extend(
            event["type"]
            for event in map(json.loads, done.stdout.splitlines())
            if event["email_id"] == email_id
        )
        return sorted(seen) == ["delivered", "sent"]

    wait_until(sent_and_delivered, timeout=30, message=f"events seen: {seen}")
