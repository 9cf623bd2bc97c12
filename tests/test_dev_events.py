"""The dev stack's SES stand-in: events shaped like AWS's, read by the production
parser; the in-memory queue's SQS semantics; the state directory's lock."""

from __future__ import annotations

import ast
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import emailrelay
from emailrelay.dev.eventqueue import DevEventQueue
from emailrelay.dev.natsserver import NatsEndpoints
from emailrelay.dev.sesevents import DevEvent, ses_event, sns_notification
from emailrelay.dev.stack import DevOptions, relay_settings
from emailrelay.dev.state import (
    NoStackRunning,
    StackInfo,
    StateDirInUse,
    StateDirLock,
    running_stack,
)
from emailrelay.engagement.events import EngagementEvent, EventKind, parse_message

EXAMPLES: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "ses-event-examples.json").read_text()
)
EMAIL_ID = "3f0c2a8e-0000-4000-8000-000000000001"
NOW = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def captured_message() -> bytes:
    """Raw, as the relay sends it: the tracking header on one line, never folded."""
    return (
        "From: LFX Self Serve <noreply@lfx.linuxfoundation.org>\r\n"
        "To: someone@example.com\r\n"
        "Subject: Hello\r\n"
        "Date: Wed, 02 Jan 2030 03:04:00 +0000\r\n"
        "Message-ID: <abc@emailrelay>\r\n"
        f"X-LFX-TRACKING-ID: a-group-id-long-enough-that-policy-smtp-would-fold-it/{EMAIL_ID}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "hi\r\n"
    ).encode()


def parsed(kind: DevEvent, **options: Any) -> EngagementEvent:
    body = sns_notification(ses_event(kind, captured_message(), now=NOW, **options), now=NOW)
    event = parse_message(body, "sqs-id")
    assert isinstance(event, EngagementEvent), event
    return event


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (DevEvent.DELIVERY, EventKind.DELIVERY),
        (DevEvent.OPEN, EventKind.OPEN),
        (DevEvent.CLICK, EventKind.CLICK),
        (DevEvent.BOUNCE, EventKind.BOUNCE),
        (DevEvent.COMPLAINT, EventKind.COMPLAINT),
    ],
)
def test_dev_events_are_read_by_the_production_parser(kind: DevEvent, expected: EventKind) -> None:
    event = parsed(kind)
    assert event.kind is expected
    assert event.email_id == EMAIL_ID
    assert event.occurred_at == NOW


@pytest.mark.parametrize("kind", list(DevEvent))
def test_dev_events_have_the_fields_of_the_aws_examples(kind: DevEvent) -> None:
    ours = ses_event(kind, captured_message(), now=NOW)
    example = EXAMPLES[kind.value]
    detail = kind.value.lower()
    assert set(ours) == set(example) - {"mail"} | {"mail"}
    assert set(ours[detail]) == set(example[detail])
    # Tags are SES configuration-set data the relay never reads.
    assert set(ours["mail"]) == set(example["mail"]) - {"tags"} | {"sourceArn"}


def test_dev_events_travel_in_an_sns_envelope_like_awss() -> None:
    body = json.loads(sns_notification(ses_event(DevEvent.OPEN, captured_message(), now=NOW)))
    assert set(body) == set(EXAMPLES["_sns_envelope_example"]) - {"Subject"}
    assert body["Type"] == "Notification"


def test_each_dev_open_is_a_distinct_event() -> None:
    assert parsed(DevEvent.OPEN).event_id != parsed(DevEvent.OPEN).event_id


def test_dev_click_carries_the_link() -> None:
    assert parsed(DevEvent.CLICK, link="https://docs.example/a").link == "https://docs.example/a"


def test_dev_bounce_carries_its_type() -> None:
    assert parsed(DevEvent.BOUNCE, bounce_type="Transient").bounce_type == "Transient"


# --- the in-memory queue --------------------------------------------------------


async def test_queue_long_poll_returns_when_a_message_arrives() -> None:
    queue = DevEventQueue()
    async with trio.open_nursery() as nursery:
        received: list[str] = []

        async def receive() -> None:
            received.extend(m.body for m in await queue.receive_messages(wait_seconds=20))

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        queue.send("event")
    assert received == ["event"]


async def test_queue_redelivers_an_undeleted_message_with_a_higher_receive_count(
    autojump_clock: trio.abc.Clock,
) -> None:
    queue = DevEventQueue(visibility_timeout=1)
    queue.send("event")
    [first] = await queue.receive_messages(wait_seconds=0)
    assert await queue.receive_messages(wait_seconds=0) == []
    [again] = await queue.receive_messages(wait_seconds=5)
    assert again.message_id == first.message_id
    assert (first.receive_count, again.receive_count) == (1, 2)


async def test_queue_deleted_message_never_comes_back(autojump_clock: trio.abc.Clock) -> None:
    queue = DevEventQueue(visibility_timeout=1)
    message_id = queue.send("event")
    [message] = await queue.receive_messages(wait_seconds=0)
    assert await queue.delete_messages([message]) == []
    await queue.wait_deleted(message_id)
    assert await queue.receive_messages(wait_seconds=20) == []  # virtual seconds


async def test_queue_holds_a_delayed_message_back(autojump_clock: trio.abc.Clock) -> None:
    queue = DevEventQueue()
    queue.send("later", delay=1)
    assert await queue.receive_messages(wait_seconds=0) == []
    [message] = await queue.receive_messages(wait_seconds=5)
    assert message.body == "later"


# --- the state directory --------------------------------------------------------


def test_second_lock_on_a_state_dir_names_the_holders_pid(tmp_path: Path) -> None:
    with StateDirLock.acquire(tmp_path), pytest.raises(StateDirInUse) as caught:
        StateDirLock.acquire(tmp_path)
    assert caught.value.pid == os.getpid()
    assert f"(PID {os.getpid()}) is using {tmp_path}" in str(caught.value)


def test_lock_is_free_again_once_released(tmp_path: Path) -> None:
    StateDirLock.acquire(tmp_path).release()
    again = StateDirLock.acquire(tmp_path)  # raises StateDirInUse if still held
    try:
        with pytest.raises(StateDirInUse):  # and the new lock holds
            StateDirLock.acquire(tmp_path)
    finally:
        again.release()


def test_running_stack_is_found_through_its_state_dir(tmp_path: Path) -> None:
    info = StackInfo(1, "nats://127.0.0.1:1", "smtp://x", "http://x", "/c", "subject")
    with StateDirLock.acquire(tmp_path) as lock:
        lock.publish(info)
        assert running_stack(tmp_path) == info


def test_stack_file_of_a_dead_stack_is_not_trusted(tmp_path: Path) -> None:
    info = StackInfo(1, "nats://127.0.0.1:1", "smtp://x", "http://x", "/c", "subject")
    with StateDirLock.acquire(tmp_path) as lock:
        lock.publish(info)
        (tmp_path / "stack.json").rename(tmp_path / "kept.json")
    (tmp_path / "kept.json").rename(tmp_path / "stack.json")  # as a SIGKILL leaves it
    with pytest.raises(NoStackRunning, match="no emailrelay dev is running"):
        running_stack(tmp_path)


# --- One wiring for dev and production ------------------------------------------

PACKAGE = Path(emailrelay.__file__).parent


def uses_of(name: str) -> dict[str, list[ast.AST]]:
    """Every use of ``name`` in the package (called, or passed on as a value),
    by module path; its definition and imports are not uses."""
    found: dict[str, list[ast.AST]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            used = (isinstance(node, ast.Name) and node.id == name) or (
                isinstance(node, ast.Attribute) and node.attr == name
            )
            if used:
                found.setdefault(str(path.relative_to(PACKAGE)), []).append(node)
    return found


def calls_to(name: str, module: str) -> list[ast.Call]:
    tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == name
    ]


def test_the_engagement_poller_is_started_by_the_relays_wiring_alone() -> None:
    """Dev cannot wire events differently from serve: nothing else starts the poller."""
    assert list(uses_of("poll_engagement_events")) == ["app.py"]


def test_dev_hands_its_event_queue_to_the_relays_own_serve() -> None:
    [serve] = calls_to("serve", "dev/stack.py")
    assert "events" in {keyword.arg for keyword in serve.keywords}


def test_dev_turns_suppression_on_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoints = NatsEndpoints("nats://127.0.0.1:1", "http://127.0.0.1:2")
    monkeypatch.delenv("SUPPRESSION_ENABLED", raising=False)
    assert relay_settings(endpoints, 3, 4).suppression_enabled is True
    monkeypatch.setenv("SUPPRESSION_ENABLED", "false")
    assert relay_settings(endpoints, 3, 4).suppression_enabled is False


def test_monitoring_port_is_8222_only_beside_the_default_nats_port() -> None:
    assert DevOptions().monitoring_port == 8222
    assert DevOptions(nats_port=0).monitoring_port == 0
    assert DevOptions(nats_port=0, nats_monitoring_port=9000).monitoring_port == 9000
