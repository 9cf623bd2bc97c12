"""A tracking record always fits the ``email-recipients`` bucket (64 KiB a value).

Only ``subject`` and ``to`` are shortened; ids and times never are. The open
and click lists keep their newest entries up to a cap while the counts stay
exact. Fast tests of the record and of event application, then a 70 KB
subject end to end: before this, such a send answered ok after 10 s of
retries and was never recorded.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from emailrelay import api
from emailrelay.api import TrackingRecord
from emailrelay.engagement.events import (
    MAX_DETAIL_TEXT,
    EngagementEvent,
    EventKind,
    Skipped,
    apply_event,
    parse_message,
)
from tests.support.handlers import handlers
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.relay import RelayProcess
from tests.support.servers.smtp import SmtpServer

T0 = datetime(2030, 1, 1, tzinfo=UTC)
EMAIL_ID = "5b0c1a5e-7f0e-4a55-9f37-0c2a3c7f6d11"


def record(**fields: Any) -> TrackingRecord:
    base: dict[str, Any] = {
        "group_id": "g",
        "email_id": EMAIL_ID,
        "to": "jane@example.org",
        "subject": "Hello",
        "sent_at": T0,
    }
    return TrackingRecord(**{**base, **fields})


def stored(rec: TrackingRecord) -> TrackingRecord:
    """The record as a reader finds it after a write."""
    encoded = rec.to_json()
    assert len(encoded) <= api.RECORD_BUDGET < api.RECORD_MAX_BYTES
    return TrackingRecord.model_validate_json(encoded)


def event(kind: EventKind, n: int, **fields: Any) -> EngagementEvent:
    return EngagementEvent(
        kind=kind,
        email_id=EMAIL_ID,
        event_id=f"event-{n}",
        occurred_at=T0 + timedelta(seconds=n),
        published_at=None,
        **fields,
    )


def opened(rec: TrackingRecord, n: int) -> bool:
    return apply_event(rec, event(EventKind.OPEN, n), T0)


def clicked(rec: TrackingRecord, n: int, link: str = "https://example.org/a") -> bool:
    return apply_event(rec, event(EventKind.CLICK, n, link=link), T0)


# --- subject and to -------------------------------------------------------------


def test_a_record_that_fits_keeps_its_whole_subject() -> None:
    assert stored(record(subject="s" * 60_000)).subject == "s" * 60_000


def test_a_70_kb_subject_is_shortened_to_fit_and_marked() -> None:
    back = stored(record(subject="s" * 70_000))
    assert back.subject.startswith("s" * 60_000)
    assert back.subject.endswith(api.SHORTENED_MARK)


def test_a_subject_that_json_escapes_heavily_still_fits() -> None:
    back = stored(record(subject='"\x01é' * 40_000))
    assert back.subject.endswith(api.SHORTENED_MARK)


def test_ids_and_times_are_never_shortened() -> None:
    group_id = "g" * api.MAX_GROUP_ID_BYTES
    back = stored(record(group_id=group_id, subject="s" * 1_000_000, to="j" * 100_000))
    assert back.group_id == group_id
    assert back.email_id == EMAIL_ID
    assert back.sent_at == T0


def test_a_huge_to_is_cut_to_a_kib_first() -> None:
    back = stored(record(to="Jane " * 100_000 + "<jane@example.org>"))
    assert len(back.to.encode()) <= api.KEPT_TEXT_BYTES
    assert back.subject == "Hello"


# --- open and click lists --------------------------------------------------------


def test_opens_beyond_the_cap_keep_the_newest_entries_and_an_exact_count() -> None:
    rec = record()
    for n in range(api.OPENS_KEPT + 50):
        assert opened(rec, n)
    back = stored(rec)
    assert back.open_count == api.OPENS_KEPT + 50
    assert len(back.opened_at_list) == api.OPENS_KEPT
    assert back.opened_at_list[0].event_id == "event-50"
    assert back.last_opened_at == T0 + timedelta(seconds=api.OPENS_KEPT + 49)


def test_a_replayed_open_among_the_kept_entries_counts_once() -> None:
    rec = record()
    for n in range(api.OPENS_KEPT + 5):
        opened(rec, n)
    assert not opened(rec, api.OPENS_KEPT + 4)
    assert rec.open_count == api.OPENS_KEPT + 5


def test_a_replayed_open_older_than_the_kept_entries_counts_again() -> None:
    # The documented limit of dedupe: it covers the kept entries only.
    rec = record()
    for n in range(api.OPENS_KEPT + 5):
        opened(rec, n)
    assert opened(rec, 0)
    assert rec.open_count == api.OPENS_KEPT + 6


def test_an_original_relay_record_with_more_opens_than_the_cap_stays_exact() -> None:
    opens = [{"event_id": f"old-{n}", "opened_at": T0.isoformat()} for n in range(300)]
    rec = TrackingRecord.model_validate(
        {**json.loads(record().to_json()), "opened_at_list": opens, "open_count": 300}
    )
    assert opened(rec, 1)
    back = stored(rec)
    assert back.open_count == 301
    assert len(back.opened_at_list) == api.OPENS_KEPT
    assert back.opened_at_list[-1].event_id == "event-1"


def test_clicks_beyond_the_cap_keep_the_newest_entries_and_an_exact_count() -> None:
    rec = record()
    for n in range(api.CLICKS_KEPT + 7):
        clicked(rec, n)
    back = stored(rec)
    assert back.click_count == api.CLICKS_KEPT + 7
    assert len(back.clicked_links) == api.CLICKS_KEPT
    assert back.clicked_links[-1].event_id == f"event-{api.CLICKS_KEPT + 6}"


def test_clicks_on_huge_links_drop_the_oldest_entries_until_the_record_fits() -> None:
    rec = record(subject="s" * 50_000)
    for n in range(20):
        clicked(rec, n, link="https://example.org/" + "x" * 20_000)
    back = stored(rec)
    assert back.click_count == 20
    assert back.clicked_links
    assert back.clicked_links[-1].event_id == "event-19"
    assert len(back.subject.encode()) >= api.KEPT_TEXT_BYTES


# --- event parsing bounds ----------------------------------------------------------


def sns_body(ses_event: dict[str, Any], message_id: str = "m1") -> str:
    return json.dumps(
        {"Type": "Notification", "MessageId": message_id, "Message": json.dumps(ses_event)}
    )


def bounce_event(**detail: Any) -> dict[str, Any]:
    return {
        "eventType": "Bounce",
        "mail": {"headers": [{"name": api.TRACKING_HEADER, "value": f"g/{EMAIL_ID}"}]},
        "bounce": {"timestamp": "2030-01-01T00:00:00Z", **detail},
    }


def test_an_over_long_event_id_is_kept_as_its_digest() -> None:
    parsed = parse_message(sns_body(bounce_event(), message_id="m" * 100_000), "sqs-1")
    assert not isinstance(parsed, Skipped)
    assert parsed.event_id.startswith("sha256:")
    assert len(parsed.event_id) == len("sha256:") + 64


def test_an_over_long_bounce_type_is_cut() -> None:
    parsed = parse_message(sns_body(bounce_event(bounceType="P" * 100_000)), "sqs-1")
    assert not isinstance(parsed, Skipped)
    assert parsed.bounce_type == "P" * MAX_DETAIL_TEXT


def test_a_lone_surrogate_in_an_event_becomes_the_replacement_character() -> None:
    body = sns_body(bounce_event(bounceType="P\ud800"), message_id="m\udc00")
    parsed = parse_message(body, "sqs-1")
    assert not isinstance(parsed, Skipped)
    assert parsed.bounce_type == "P\ufffd"
    rec = record()
    apply_event(rec, parsed, T0)
    assert stored(rec).bounce_type == "P\ufffd"


# --- the send handler ------------------------------------------------------------


async def test_a_70_kb_subject_send_is_recorded_and_found() -> None:
    h = handlers()
    reply = json.loads(
        await h.send(json.dumps({**send_request(), "subject": "s" * 70_000}).encode())
    )
    found = json.loads(await h.status(json.dumps({"email_id": reply["email_id"]}).encode()))
    assert found["email_id"] == reply["email_id"]
    assert found["subject"].endswith(api.SHORTENED_MARK)


# --- end to end --------------------------------------------------------------------


def test_a_70_kb_subject_send_is_recorded_and_status_finds_it(
    module_relay: RelayProcess, module_nats_client: SyncNats, smtp: SmtpServer
) -> None:
    subject = "Quarterly report " * 4_200
    assert len(subject) > 70_000
    reply = module_nats_client.request_json(
        api.SEND_EMAIL_SUBJECT, {**send_request(), "subject": subject}
    )
    assert "email_id" in reply, reply
    found = module_nats_client.request_json(
        api.GET_EMAIL_STATUS_SUBJECT, {"email_id": reply["email_id"]}
    )
    assert found.get("email_id") == reply["email_id"], found
    assert subject.startswith(found["subject"].removesuffix(api.SHORTENED_MARK))
    stored_value = module_nats_client.kv_get(api.RECIPIENTS_BUCKET, reply["email_id"])
    assert stored_value is not None
    assert len(stored_value) <= api.RECORD_MAX_BYTES
    (message,) = smtp.wait_for_messages(1)
    assert message.parsed["Subject"] == subject
    assert "tracking write failed" not in module_relay.logs()
