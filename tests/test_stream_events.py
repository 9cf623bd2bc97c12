"""EMAIL_EVENTS without a server: the events built from records and SES events
(pure), the poller's handler keeping a message whose event was not published,
the send path's ``sent`` event falling back to the pending writes, and the
pending writes publishing it later. End to end: test_events_stream_e2e.py."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from emailrelay import api
from emailrelay.bridge.nats import NoStreamAnswered
from emailrelay.config import ConfigError, load_settings
from emailrelay.deadline import Deadline
from emailrelay.engagement.events import EngagementEvent, EventKind, parse_message
from emailrelay.engagement.handler import EventHandler
from emailrelay.engagement.outcomes import recipient_of, sent_event, ses_outcome
from emailrelay.engagement.stream import (
    EventPublisher,
    SentEvents,
    events_stream_spec,
    open_events_stream,
)
from emailrelay.store.kv import StoreError
from emailrelay.store.pending import PendingTrackingWrites
from tests.support.fakes import FakeStore, message
from tests.support.ses_events import EMAIL_ID, SES_EXAMPLES, ses_event, sns_body

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def a_record(to: str = "Pat Example <Pat@Example.com>") -> api.TrackingRecord:
    return api.TrackingRecord(
        group_id="g",
        email_id=EMAIL_ID,
        to=to,
        subject="s",
        sent_at=datetime(2024, 5, 1, tzinfo=UTC),
    )


def parsed(example: str, sns_message_id: str = "sns-1", **detail: str) -> EngagementEvent:
    event = ses_event(example, email_id=EMAIL_ID)
    if detail:
        key = {"DeliveryDelay": "deliveryDelay"}.get(example, example.lower())
        event[key].update(detail)
    result = parse_message(sns_body(event, sns_message_id=sns_message_id), "sqs-1")
    assert isinstance(result, EngagementEvent)
    return result


def outcome(example: str, **detail: str) -> api.EmailEvent:
    event = ses_outcome(a_record(), parsed(example, **detail), NOW)
    assert event is not None
    return event


# --- building events ---------------------------------------------------------------------


def test_sent_event_id_is_sent_and_the_email_id() -> None:
    assert sent_event(a_record()).event_id == f"sent:{EMAIL_ID}"


def test_recipient_is_the_bare_address_of_the_records_to() -> None:
    assert recipient_of(a_record()) == "Pat@Example.com"


def test_the_same_ses_event_in_two_sns_notifications_has_one_id() -> None:
    first = ses_outcome(a_record(), parsed("Open", sns_message_id="sns-1"), NOW)
    second = ses_outcome(a_record(), parsed("Open", sns_message_id="sns-2"), NOW)
    assert first is not None
    assert second is not None
    assert first.event_id == second.event_id


def test_two_opens_at_different_times_have_different_ids() -> None:
    early = outcome("Open", timestamp="2024-05-01T10:00:00Z")
    late = outcome("Open", timestamp="2024-05-01T10:00:01Z")
    assert early.event_id != late.event_id


def test_ids_differ_by_type_for_the_same_message_and_time() -> None:
    bounce = outcome("Bounce", timestamp="2024-05-01T10:00:00Z")
    complaint = outcome("Complaint", timestamp="2024-05-01T10:00:00Z")
    assert bounce.event_id.split(":")[0] == "bounced"
    assert bounce.event_id.split(":")[1] != complaint.event_id.split(":")[1]


def test_ids_differ_by_ses_message_id() -> None:
    other = ses_event("Delivery", email_id=EMAIL_ID)
    other["mail"]["messageId"] = "another-ses-message"
    event = parse_message(sns_body(other), "sqs-1")
    assert isinstance(event, EngagementEvent)
    first = ses_outcome(a_record(), event, NOW)
    assert first is not None
    assert first.event_id != outcome("Delivery").event_id


def test_an_event_id_holds_no_address() -> None:
    assert "example.com" not in outcome("Bounce").event_id.lower()


def test_an_event_without_a_time_takes_now_and_keeps_one_id() -> None:
    first = ses_outcome(a_record(), parsed("Reject"), NOW)
    later = ses_outcome(a_record(), parsed("Reject", sns_message_id="sns-2"), datetime.now(UTC))
    assert first is not None
    assert later is not None
    assert first.occurred_at == NOW
    assert first.event_id == later.event_id


def test_ses_send_is_not_a_stream_event() -> None:
    assert ses_outcome(a_record(), parsed("Send"), NOW) is None


@pytest.mark.parametrize(
    ("example", "fields"),
    [
        ("Bounce", {"bounce_type": "Permanent", "bounce_sub_type": "General"}),
        ("Complaint", {"complaint_feedback_type": "abuse"}),
        (
            "Click",
            {"link": SES_EXAMPLES["Click"]["click"]["link"]},
        ),
        ("Delivery", {}),
        ("Open", {}),
        ("DeliveryDelay", {}),
        ("Reject", {}),
    ],
)
def test_each_type_carries_only_its_own_details(example: str, fields: dict[str, str]) -> None:
    body = json.loads(outcome(example).to_json())
    common = {"event_id", "type", "email_id", "group_id", "recipient", "occurred_at"}
    assert set(body) == common | {"ses_message_id"} | set(fields)
    assert {name: body[name] for name in fields} == fields


def test_event_json_omits_unset_fields_and_writes_utc_z_times() -> None:
    body = json.loads(sent_event(a_record()).to_json())
    assert body == {
        "event_id": f"sent:{EMAIL_ID}",
        "type": "sent",
        "email_id": EMAIL_ID,
        "group_id": "g",
        "recipient": "Pat@Example.com",
        "occurred_at": "2024-05-01T00:00:00Z",
    }


# --- the poller's handler -------------------------------------------------------------------


class FakePublisher:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.published: list[api.EmailEvent] = []

    async def publish(self, event: api.EmailEvent) -> None:
        if self.error is not None:
            raise self.error
        self.published.append(event)


async def test_applied_event_is_published_then_deleted() -> None:
    events = FakePublisher()
    handler = EventHandler(FakeStore(a_record()), max_receives=5, events=events)
    assert await handler.handle(message(sns_body(ses_event("Bounce")))) == ("bounce", "applied")
    assert [event.type for event in events.published] == ["bounced"]


async def test_event_the_stream_did_not_store_stays_in_the_queue() -> None:
    store = FakeStore(a_record())
    handler = EventHandler(store, max_receives=5, events=FakePublisher(StoreError("no stream")))
    assert await handler.handle(message(sns_body(ses_event("Bounce")))) == ("bounce", "retry")
    assert store.record is not None
    assert store.record.failed  # the record was updated: a redelivery finds a duplicate


async def test_a_duplicate_update_is_published_again() -> None:
    events = FakePublisher()
    handler = EventHandler(FakeStore(a_record()), max_receives=5, events=events)
    body = sns_body(ses_event("Delivery"))
    await handler.handle(message(body, "m1"))
    assert await handler.handle(message(body, "m2")) == ("delivery", "duplicate")
    assert [event.event_id for event in events.published] == [events.published[0].event_id] * 2


async def test_ses_send_publishes_nothing() -> None:
    events = FakePublisher()
    handler = EventHandler(FakeStore(a_record()), max_receives=5, events=events)
    await handler.handle(message(sns_body(ses_event("Send"))))
    assert events.published == []


# --- the send path's sent event --------------------------------------------------------------


class FakeStreamHost:
    """:class:`emailrelay.engagement.stream.StreamHost` that fails, hangs or stores."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.hang = False
        self.stored: dict[str, bytes] = {}
        self.attempts = 0

    async def stream_exists(self, name: str) -> bool:
        return True

    async def create_stream(self, spec: object) -> None:
        return None

    async def publish_to_stream(self, subject: str, data: bytes, msg_id: str) -> bool:
        self.attempts += 1
        if self.hang:
            await anyio.sleep_forever()
        if self.error is not None:
            raise self.error
        duplicate = msg_id in self.stored
        self.stored.setdefault(msg_id, data)
        return duplicate


class FakePending:
    def __init__(self) -> None:
        self.added: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def add_publish(self, key: str, publish: Callable[[], Awaitable[None]], size: int) -> bool:
        self.added.append((key, publish))
        return True


async def test_sent_event_is_published_at_once_when_the_stream_answers() -> None:
    host, pending = FakeStreamHost(), FakePending()
    await SentEvents(EventPublisher(host), pending).sent(a_record(), Deadline.never())
    assert list(host.stored) == [f"sent:{EMAIL_ID}"]
    assert pending.added == []


async def test_sent_event_the_stream_refuses_goes_to_the_pending_writes() -> None:
    host, pending = FakeStreamHost(), FakePending()
    host.error = StoreError("no responders")
    await SentEvents(EventPublisher(host), pending).sent(a_record(), Deadline.never())
    assert [key for key, _ in pending.added] == [f"sent:{EMAIL_ID}"]
    host.error = None
    await pending.added[0][1]()
    assert list(host.stored) == [f"sent:{EMAIL_ID}"]


async def test_sent_event_waits_at_most_its_bound_before_the_reply() -> None:
    host, pending = FakeStreamHost(), FakePending()
    host.hang = True
    started = anyio.current_time()
    await SentEvents(EventPublisher(host), pending, wait=0.2).sent(a_record(), Deadline.never())
    assert anyio.current_time() - started < 1.0
    assert len(pending.added) == 1


async def test_sent_event_past_the_deadline_is_not_tried_before_the_reply() -> None:
    host, pending = FakeStreamHost(), FakePending()
    host.hang = True
    started = anyio.current_time()
    await SentEvents(EventPublisher(host), pending).sent(a_record(), Deadline.after(-1))
    assert anyio.current_time() - started < 0.1
    assert len(pending.added) == 1


# --- the pending writes publish it later ----------------------------------------------------


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (nothing here has an event for it); fail after a deadline."""
    with anyio.fail_after(5):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


async def test_pending_publish_is_retried_until_the_stream_answers() -> None:
    host = FakeStreamHost()
    host.error = StoreError("down")
    publisher = EventPublisher(host)
    event = sent_event(a_record())
    pending = PendingTrackingWrites(backoff_initial=0.01, backoff_max=0.02)
    assert pending.add_publish(event.event_id, lambda: publisher.publish(event), 100)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pending.write_when_possible)
        await until(lambda: host.attempts >= 3)
        assert len(pending) == 1
        host.error = None
        await until(lambda: not len(pending))
        tg.cancel_scope.cancel()
    assert list(host.stored) == [event.event_id]


def test_a_full_queue_drops_a_publish() -> None:
    pending = PendingTrackingWrites(max_writes=1)

    async def publish() -> None:
        return None

    assert pending.add_publish("sent:a", publish, 10)
    assert not pending.add_publish("sent:b", publish, 10)
    assert len(pending) == 1


def test_kinds_map_onto_every_ses_stream_type() -> None:
    from emailrelay.engagement.outcomes import STREAM_TYPES

    assert set(STREAM_TYPES.values()) | {"sent"} == set(api.EVENT_TYPES)
    assert EventKind.SEND not in STREAM_TYPES


# --- settings -----------------------------------------------------------------------------------


def test_events_settings_default_to_off_30_days_1_gib_and_2_minutes() -> None:
    settings = load_settings({})
    assert settings.events_stream_enabled is False
    assert settings.events_max_age == 30 * 24 * 3600
    assert settings.events_max_bytes == 1024**3
    assert settings.events_duplicate_window == 120


def test_a_duplicate_window_under_2_minutes_is_refused() -> None:
    with pytest.raises(ConfigError, match="EVENTS_DUPLICATE_WINDOW must be at least 2m"):
        load_settings({"EVENTS_DUPLICATE_WINDOW": "90s"})


def test_a_duplicate_window_longer_than_the_max_age_is_refused() -> None:
    with pytest.raises(ConfigError, match="must not be longer than EVENTS_MAX_AGE"):
        load_settings({"EVENTS_DUPLICATE_WINDOW": "10m", "EVENTS_MAX_AGE": "5m"})


# --- the contract's examples ------------------------------------------------------------------

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "contract.md"


def contract_examples() -> list[dict[str, object]]:
    """The JSON lines of docs/contract.md's "One example per type" block."""
    text = CONTRACT.read_text()
    block = text.split("One example per type", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    return [json.loads(line) for line in block.strip().splitlines()]


def test_the_contract_shows_one_example_per_type_each_a_valid_event() -> None:
    examples = contract_examples()
    assert [example["type"] for example in examples] == list(api.EVENT_TYPES)
    for example in examples:
        event = api.EmailEvent.model_validate(example)
        assert json.loads(event.to_json()) == example
        assert event.event_id.startswith(f"{event.type}:")


# --- a stream that is not there ----------------------------------------------------------------


class MissingStreamHost(FakeStreamHost):
    """No stream until ``create_stream``: publishes are answered by nobody."""

    def __init__(self) -> None:
        super().__init__()
        self.exists = False
        self.creates = 0

    async def stream_exists(self, name: str) -> bool:
        return self.exists

    async def create_stream(self, spec: object) -> None:
        self.creates += 1
        self.exists = True

    async def publish_to_stream(self, subject: str, data: bytes, msg_id: str) -> bool:
        if not self.exists:
            raise NoStreamAnswered("no stream answered")
        return await super().publish_to_stream(subject, data, msg_id)


SPEC = events_stream_spec(1, 3600.0, 1024, 120.0)


async def test_a_publish_nobody_answered_creates_the_stream_and_publishes_again() -> None:
    host = MissingStreamHost()
    await EventPublisher(host, recreate=SPEC).publish(sent_event(a_record()))
    assert host.creates == 1
    assert list(host.stored) == [f"sent:{EMAIL_ID}"]


async def test_without_auto_create_a_missing_stream_fails_the_publish() -> None:
    host = MissingStreamHost()
    with pytest.raises(StoreError):
        await EventPublisher(host).publish(sent_event(a_record()))
    assert host.creates == 0


async def test_missing_stream_is_not_created_without_auto_create_at_start() -> None:
    assert not await open_events_stream(MissingStreamHost(), SPEC, auto_create=False)
