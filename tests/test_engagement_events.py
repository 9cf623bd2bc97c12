"""Parsing SQS bodies into SES events and applying them to tracking records (pure functions).

Events are built from AWS's documented examples (tests/data/ses-event-examples.json, a copy of
the shared examples file).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from emailrelay.api import TrackingRecord
from emailrelay.engagement.events import (
    EngagementEvent,
    EventKind,
    Skipped,
    apply_event,
    parse_message,
)
from tests.support.ses_events import (
    EMAIL_ID,
    EVENT_TYPES,
    GROUP_ID,
    SES_EXAMPLES,
    ses_event,
    sns_body,
)

SQS_MESSAGE_ID = "sqs-message-1"
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def parsed(body: str) -> EngagementEvent:
    result = parse_message(body, SQS_MESSAGE_ID)
    assert isinstance(result, EngagementEvent), result
    return result


def record() -> TrackingRecord:
    return TrackingRecord(
        group_id=GROUP_ID,
        email_id=EMAIL_ID,
        to="recipient@example.com",
        subject="hi",
        sent_at=datetime(2017, 8, 1, tzinfo=UTC),
    )


def t(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- parsing -------------------------------------------------------------------


@pytest.mark.parametrize("example", EVENT_TYPES)
def test_sns_wrapped_event_is_parsed_with_the_sns_message_id(example: str) -> None:
    event = parsed(sns_body(ses_event(example), sns_message_id="sns-1"))
    assert event.kind is EventKind(example.lower().replace("deliverydelay", "delivery_delay"))
    assert event.email_id == EMAIL_ID
    assert event.event_id == "sns-1"


@pytest.mark.parametrize("example", EVENT_TYPES)
def test_raw_event_is_parsed_with_the_sqs_message_id(example: str) -> None:
    event = parsed(json.dumps(ses_event(example)))
    assert event.email_id == EMAIL_ID
    assert event.event_id == SQS_MESSAGE_ID


@pytest.mark.parametrize(
    ("example", "kind"),
    [
        ("notificationType:Bounce", EventKind.BOUNCE),
        ("notificationType:Delivery", EventKind.DELIVERY),
    ],
)
def test_identity_notification_type_is_read(example: str, kind: EventKind) -> None:
    assert parsed(sns_body(ses_event(example))).kind is kind


def test_event_type_is_matched_case_insensitively() -> None:
    event = ses_event("Open")
    event["eventType"] = "oPEN"
    assert parsed(json.dumps(event)).kind is EventKind.OPEN


def test_tracking_header_name_is_matched_case_insensitively() -> None:
    event = ses_event("Delivery", header_name="x-lfx-tracking-id")
    assert parsed(json.dumps(event)).email_id == EMAIL_ID


def test_email_id_is_the_part_after_the_last_slash() -> None:
    event = ses_event("Open")
    event["mail"]["headers"][-1]["value"] = f"a/b/c/{EMAIL_ID}"
    assert parsed(json.dumps(event)).email_id == EMAIL_ID


def test_tracking_value_without_slash_is_the_email_id() -> None:
    event = ses_event("Open")
    event["mail"]["headers"][-1]["value"] = EMAIL_ID
    assert parsed(json.dumps(event)).email_id == EMAIL_ID


def test_detail_timestamp_is_the_event_time() -> None:
    event = parsed(json.dumps(ses_event("Open")))
    assert event.occurred_at == t("2017-08-09T22:00:19.652Z")


@pytest.mark.parametrize("timestamp", [None, "yesterday", 12345])
def test_missing_or_unparseable_timestamp_leaves_the_event_time_unset(timestamp: Any) -> None:
    event = ses_event("Delivery")
    if timestamp is None:
        del event["delivery"]["timestamp"]
    else:
        event["delivery"]["timestamp"] = timestamp
    assert parsed(json.dumps(event)).occurred_at is None


def test_event_details_are_read_from_the_documented_fields() -> None:
    assert parsed(json.dumps(ses_event("Bounce"))).bounce_type == "Permanent"
    assert parsed(json.dumps(ses_event("Bounce"))).bounce_sub_type == "General"
    assert parsed(json.dumps(ses_event("Complaint"))).complaint_feedback_type == "abuse"
    assert parsed(json.dumps(ses_event("Reject"))).reject_reason == "Bad content"
    assert (
        parsed(json.dumps(ses_event("DeliveryDelay"))).delay_type == "TransientCommunicationFailure"
    )
    assert parsed(json.dumps(ses_event("Click"))).link == (
        "http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html"
    )
    assert parsed(json.dumps(ses_event("Send"))).ses_message_id == (
        "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"
    )


@pytest.mark.parametrize(
    ("body", "label"),
    [
        ("not json", "malformed"),
        ("[1, 2]", "malformed"),
        ('"a string"', "malformed"),
        ('{"Type": "Notification", "MessageId": "x"}', "malformed"),
        ('{"Type": "Notification", "Message": "not json"}', "malformed"),
        ('{"Type": "Notification", "Message": "[1]"}', "malformed"),
        ('{"eventType": "Open"}', "malformed"),
        ('{"eventType": 7, "mail": {}}', "malformed"),
        ('{"Type": "SubscriptionConfirmation", "Message": "{}"}', "other"),
    ],
)
def test_malformed_body_is_skipped(body: str, label: str) -> None:
    result = parse_message(body, SQS_MESSAGE_ID)
    assert isinstance(result, Skipped)
    assert result.label == label


@pytest.mark.parametrize(
    ("example", "label"),
    [("Rendering Failure", "rendering_failure"), ("Subscription", "subscription")],
)
def test_untracked_event_types_are_skipped(example: str, label: str) -> None:
    result = parse_message(sns_body(ses_event(example)), SQS_MESSAGE_ID)
    assert result == Skipped(label, result.reason if isinstance(result, Skipped) else "")


def test_unknown_event_type_is_skipped() -> None:
    event = ses_event("Open")
    event["eventType"] = "Teleport"
    result = parse_message(json.dumps(event), SQS_MESSAGE_ID)
    assert isinstance(result, Skipped)
    assert result.label == "other"


def test_event_without_tracking_header_is_skipped() -> None:
    result = parse_message(sns_body(SES_EXAMPLES["Open"]), SQS_MESSAGE_ID)
    assert isinstance(result, Skipped)
    assert result.label == "no_tracking_header"


def test_tracking_id_that_cannot_be_a_key_is_skipped() -> None:
    event = ses_event("Open")
    event["mail"]["headers"][-1]["value"] = "group/not a key!"
    result = parse_message(json.dumps(event), SQS_MESSAGE_ID)
    assert isinstance(result, Skipped)
    assert result.label == "no_tracking_header"


def test_skip_reason_never_contains_the_body() -> None:
    secret = "someone@example.com"
    result = parse_message(f'{{"Type": "Notification", "x": "{secret}"}}', SQS_MESSAGE_ID)
    assert isinstance(result, Skipped)
    assert secret not in result.reason


# --- applying --------------------------------------------------------------------


def event_of(example: str, event_id: str = "e1", **changes: Any) -> EngagementEvent:
    event = ses_event(example)
    detail_key = {"DeliveryDelay": "deliveryDelay"}.get(example, example.lower())
    for key, value in changes.items():
        event[detail_key][key] = value
    result = parse_message(sns_body(event, sns_message_id=event_id), SQS_MESSAGE_ID)
    assert isinstance(result, EngagementEvent)
    return result


def test_delivery_sets_delivered_and_its_time() -> None:
    r = record()
    assert apply_event(r, event_of("Delivery"), NOW)
    assert r.delivered
    assert r.delivered_at == t("2016-10-19T23:21:04.133Z")


def test_first_delivery_applied_wins() -> None:
    r = record()
    apply_event(r, event_of("Delivery", "e1", timestamp="2020-01-02T00:00:00Z"), NOW)
    assert not apply_event(r, event_of("Delivery", "e2", timestamp="2020-01-01T00:00:00Z"), NOW)
    assert r.delivered_at == t("2020-01-02T00:00:00Z")


def test_event_without_time_uses_processing_time() -> None:
    r = record()
    apply_event(r, event_of("Delivery", timestamp="garbage"), NOW)
    assert r.delivered_at == NOW


def test_open_appends_and_counts() -> None:
    r = record()
    assert apply_event(r, event_of("Open", "e1"), NOW)
    assert r.opened
    assert r.open_count == 1
    assert [(o.event_id, o.opened_at) for o in r.opened_at_list] == [
        ("e1", t("2017-08-09T22:00:19.652Z"))
    ]
    assert r.last_opened_at == t("2017-08-09T22:00:19.652Z")


def test_replayed_open_counts_once() -> None:
    r = record()
    apply_event(r, event_of("Open", "e1"), NOW)
    assert not apply_event(r, event_of("Open", "e1"), NOW)
    assert r.open_count == 1


def test_opens_out_of_order_keep_the_latest_last_opened_at() -> None:
    r = record()
    apply_event(r, event_of("Open", "late", timestamp="2020-01-02T00:00:00Z"), NOW)
    apply_event(r, event_of("Open", "early", timestamp="2020-01-01T00:00:00Z"), NOW)
    assert r.open_count == 2
    assert r.last_opened_at == t("2020-01-02T00:00:00Z")


def test_last_opened_at_compares_instants_not_strings() -> None:
    r = record()
    apply_event(r, event_of("Open", "a", timestamp="2020-01-01T10:00:00+05:00"), NOW)
    apply_event(r, event_of("Open", "b", timestamp="2020-01-01T06:00:00Z"), NOW)
    assert r.last_opened_at == t("2020-01-01T06:00:00Z")


def test_click_appends_link_and_counts_with_dedupe() -> None:
    r = record()
    assert apply_event(r, event_of("Click", "c1", timestamp="2020-01-02T00:00:00Z"), NOW)
    assert apply_event(r, event_of("Click", "c2", timestamp="2020-01-01T00:00:00Z"), NOW)
    assert not apply_event(r, event_of("Click", "c1"), NOW)
    assert r.clicked
    assert r.click_count == 2
    assert r.last_clicked_at == t("2020-01-02T00:00:00Z")
    assert r.clicked_links[0].link.startswith("http://docs.aws.amazon.com/")


def test_bounce_marks_failed_with_bounce_type() -> None:
    r = record()
    assert apply_event(r, event_of("Bounce"), NOW)
    assert (r.failed, r.failed_at) == (True, t("2017-08-05T00:41:02.669Z"))
    assert (r.bounce_type, r.bounce_sub_type) == ("Permanent", "General")


def test_complaint_marks_failed_with_feedback_type() -> None:
    r = record()
    assert apply_event(r, event_of("Complaint"), NOW)
    assert (r.failed, r.failed_at) == (True, t("2017-08-05T00:41:02.669Z"))
    assert r.complaint_feedback_type == "abuse"


def test_reject_marks_failed_with_reason() -> None:
    r = record()
    assert apply_event(r, event_of("Reject"), NOW)
    assert (r.failed, r.failed_at) == (True, NOW)  # a Reject has no timestamp of its own
    assert r.reject_reason == "Bad content"


def test_first_failure_applied_wins_but_complaint_type_is_kept() -> None:
    r = record()
    apply_event(r, event_of("Bounce", "b", timestamp="2020-01-02T00:00:00Z"), NOW)
    apply_event(r, event_of("Complaint", "c", timestamp="2020-01-01T00:00:00Z"), NOW)
    assert r.failed_at == t("2020-01-02T00:00:00Z")
    assert r.complaint_feedback_type == "abuse"


def test_delivery_then_bounce_records_both() -> None:
    r = record()
    apply_event(r, event_of("Delivery"), NOW)
    apply_event(r, event_of("Bounce"), NOW)
    assert r.delivered
    assert r.failed


def test_delivery_delay_keeps_the_latest_delay() -> None:
    r = record()
    apply_event(r, event_of("DeliveryDelay", "d2", timestamp="2020-01-02T00:00:00Z"), NOW)
    late = event_of("DeliveryDelay", "d1", timestamp="2020-01-01T00:00:00Z", delayType="Other")
    assert not apply_event(r, late, NOW)
    assert r.delayed
    assert r.last_delayed_at == t("2020-01-02T00:00:00Z")
    assert r.delay_type == "TransientCommunicationFailure"


def test_send_records_the_ses_message_id_once() -> None:
    r = record()
    assert apply_event(r, event_of("Send"), NOW)
    assert r.ses_message_id == "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"
    assert not apply_event(r, event_of("Send", "e2"), NOW)


@pytest.mark.parametrize("example", EVENT_TYPES)
def test_applying_the_same_event_twice_changes_nothing(example: str) -> None:
    r = record()
    event = event_of(example)
    assert apply_event(r, event, NOW)
    before = r.to_json()
    assert not apply_event(r, event, NOW)
    assert r.to_json() == before


# --- the record on the wire -----------------------------------------------------


def test_new_record_fields_are_omitted_while_unset() -> None:
    data = json.loads(record().to_json())
    added = {
        "clicked",
        "click_count",
        "last_clicked_at",
        "clicked_links",
        "bounce_type",
        "bounce_sub_type",
        "complaint_feedback_type",
        "reject_reason",
        "delayed",
        "last_delayed_at",
        "delay_type",
        "ses_message_id",
    }
    assert added.isdisjoint(data)
    assert data["open_count"] == 0


def test_record_with_every_event_round_trips_through_json() -> None:
    r = record()
    for example in EVENT_TYPES:
        apply_event(r, event_of(example, f"id-{example}"), NOW)
    data = json.loads(r.to_json())
    assert data["clicked_links"] == [
        {
            "event_id": "id-Click",
            "link": "http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html",
            "clicked_at": "2017-08-09T23:51:25.570000Z",
        }
    ]
    assert data["delayed"] is True
    assert data["last_delayed_at"] == "2020-06-16T00:25:40.095000Z"
    assert TrackingRecord.model_validate_json(r.to_json()) == r
