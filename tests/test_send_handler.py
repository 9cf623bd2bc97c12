"""``send_email`` rules, fast: SendEmailHandler over a fake Sender and a fake TrackingWriter.

The same behaviours are proven end to end in test_send_e2e.py.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import pytest

from emailrelay import api
from emailrelay.deadline import Deadline, DeadlinePassed
from emailrelay.handlers.replies import encode_reply
from emailrelay.handlers.send import (
    NoTracking,
    SendEmailHandler,
    SendRules,
    TrackingOnceOpen,
    TrackingWriter,
)
from emailrelay.mail.errors import AmbiguousFailure, PermanentFailure
from emailrelay.store.kv import BucketMissing, StoreError
from emailrelay.store.pending import PendingTrackingWrites
from emailrelay.store.tracking import TrackingStore
from tests.support.fakes import FakeSender, MemoryKeyValue
from tests.support.send_requests import RULES, send_request
from tests.support.waiting import wait_for


@dataclass
class FakeTracking:
    """Slow on purpose (a checkpoint per write), so a reply sent before the writes shows."""

    records: list[api.TrackingRecord] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    failures_left: int = 0
    failure: Exception = field(default_factory=lambda: StoreError("store down"))
    append_failures_left: int = 0
    creates: int = 0
    electing: bool = False
    """Writes hang, as JetStream's do while a stream has no leader."""
    lost_replies: int = 0
    """The next creates land but their reply never comes."""

    async def create_record(self, record: api.TrackingRecord) -> None:
        await anyio.sleep(0.001)
        if self.electing:
            await anyio.sleep_forever()
        if record in self.records:
            return  # a retried create that conflicts: the first one landed
        if self.lost_replies:
            self.lost_replies -= 1
            self.records.append(record)
            await anyio.sleep_forever()
        self.creates += 1
        if self.failures_left:
            self.failures_left -= 1
            raise self.failure
        self.records.append(record)

    async def append_to_group(self, group_id: str, email_id: str) -> None:
        await anyio.sleep(0.001)
        if self.append_failures_left:
            self.append_failures_left -= 1
            raise self.failure
        ids = self.groups.setdefault(group_id, [])
        if email_id not in ids:
            ids.append(email_id)


@dataclass
class Deferred:
    record: api.TrackingRecord
    writer: TrackingWriter
    record_stored: bool


@dataclass
class FakePending:
    capacity: int = 100
    writes: list[Deferred] = field(default_factory=list)

    def add(
        self, record: api.TrackingRecord, writer: TrackingWriter, *, record_stored: bool
    ) -> bool:
        if len(self.writes) >= self.capacity:
            return False
        self.writes.append(Deferred(record, writer, record_stored))
        return True


@dataclass
class Relay:
    handler: SendEmailHandler
    sender: FakeSender
    tracking: FakeTracking
    tracking_failures: list[None]
    pending: FakePending | None = None

    async def send(self, request: Any) -> dict[str, Any]:
        data = request if isinstance(request, bytes) else json.dumps(request).encode()
        reply: dict[str, Any] = json.loads(encode_reply(await self.handler(data)))
        return reply


def make_relay(
    rules: SendRules = RULES,
    *,
    tracking_wait: float = 1.0,
    tracking: bool | TrackingWriter = True,
    pending: FakePending | None = None,
) -> Relay:
    sender, store = FakeSender(), FakeTracking()
    writer: TrackingWriter = store if tracking is True else tracking or NoTracking()
    failures: list[None] = []
    handler = SendEmailHandler(
        rules,
        sender,
        writer,
        tracking_wait=tracking_wait,
        on_tracking_failure=lambda: failures.append(None),
        pending=pending,
    )
    return Relay(handler, sender, store, failures, pending)


@pytest.fixture
def relay() -> Relay:
    return make_relay()


def error(message: str) -> dict[str, str]:
    return {"error": message}


SKIPPED = {"email_id": "", "group_id": ""}

# 1. payload shape


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'"a string"', b"42", b"", b"\xff\xfe"],
    ids=["not-json", "array", "string", "number", "empty", "not-utf8"],
)
async def test_body_that_is_not_a_json_object_is_invalid(relay: Relay, body: bytes) -> None:
    assert await relay.send(body) == error(api.ERR_INVALID_PAYLOAD)


async def test_null_body_is_invalid_or_missing_fields(relay: Relay) -> None:
    assert await relay.send(b"null") in (
        error(api.ERR_INVALID_PAYLOAD),
        error(api.ERR_SEND_FIELDS_REQUIRED),
    )


@pytest.mark.parametrize(
    "field_name", ["to", "subject", "html", "text", "from", "from_display_name", "reply_to"]
)
@pytest.mark.parametrize("value", [5, True, ["a@b.example"], {"a": 1}], ids=str)
async def test_field_of_the_wrong_type_is_invalid(
    relay: Relay, field_name: str, value: object
) -> None:
    assert await relay.send({**send_request(), field_name: value}) == error(api.ERR_INVALID_PAYLOAD)


async def test_group_id_of_the_wrong_type_is_invalid(relay: Relay) -> None:
    assert await relay.send({**send_request(), "group_id": 7}) == error(api.ERR_INVALID_PAYLOAD)


async def test_wrong_type_is_checked_before_missing_fields(relay: Relay) -> None:
    assert await relay.send({"subject": 1}) == error(api.ERR_INVALID_PAYLOAD)


async def test_unknown_fields_are_ignored(relay: Relay) -> None:
    reply = await relay.send({**send_request(), "cc": ["x@example.com"], "priority": 1})
    assert reply["email_id"]
    assert len(relay.sender.sent) == 1


# 2. required fields


@pytest.mark.parametrize("field_name", ["to", "subject", "html", "text"])
async def test_missing_required_field(relay: Relay, field_name: str) -> None:
    assert await relay.send(send_request(**{field_name: None})) == error(
        api.ERR_SEND_FIELDS_REQUIRED
    )


@pytest.mark.parametrize("field_name", ["to", "subject", "html", "text"])
async def test_empty_required_field(relay: Relay, field_name: str) -> None:
    assert await relay.send(send_request(**{field_name: ""})) == error(api.ERR_SEND_FIELDS_REQUIRED)


async def test_empty_object_is_missing_fields(relay: Relay) -> None:
    assert await relay.send({}) == error(api.ERR_SEND_FIELDS_REQUIRED)


async def test_missing_fields_are_checked_before_the_address(relay: Relay) -> None:
    assert await relay.send(send_request(to="nonsense", text="")) == error(
        api.ERR_SEND_FIELDS_REQUIRED
    )


# 3. recipient allowlist

RECIPIENT_RULES = replace(RULES, allowed_recipient_domains=("example.com",))


async def test_recipient_in_allowlisted_domain_is_sent() -> None:
    relay = make_relay(RECIPIENT_RULES)
    assert (await relay.send(send_request(to="jane@example.com")))["email_id"]
    assert len(relay.sender.sent) == 1


async def test_recipient_in_allowlisted_subdomain_is_sent() -> None:
    relay = make_relay(RECIPIENT_RULES)
    assert (await relay.send(send_request(to="jane@eu.example.com")))["email_id"]


async def test_recipient_outside_allowlist_is_skipped_with_empty_ids() -> None:
    relay = make_relay(RECIPIENT_RULES)
    assert await relay.send(send_request(to="jane@other.org")) == SKIPPED
    assert relay.sender.sent == []
    assert relay.tracking.records == []
    assert relay.tracking.groups == {}


async def test_recipient_allowlist_needs_a_label_boundary() -> None:
    relay = make_relay(RECIPIENT_RULES)
    assert await relay.send(send_request(to="jane@notexample.com")) == SKIPPED


async def test_unparseable_recipient_with_allowlist_is_skipped() -> None:
    relay = make_relay(RECIPIENT_RULES)
    assert await relay.send(send_request(to="not an address")) == SKIPPED


async def test_recipient_allowlist_is_checked_before_from() -> None:
    relay = make_relay(RECIPIENT_RULES)
    reply = await relay.send(send_request(to="jane@other.org", from_="x@evil.example"))
    assert reply == SKIPPED


# 4. to


@pytest.mark.parametrize("to", ["plainword", "a@b.example, c@d.example", "a@", "@b.example"])
async def test_unparseable_to(relay: Relay, to: str) -> None:
    assert await relay.send(send_request(to=to)) == error(api.ERR_INVALID_TO)


async def test_non_ascii_domain_in_to_is_invalid_to(relay: Relay) -> None:
    assert await relay.send(send_request(to="user@bücher.example")) == error(api.ERR_INVALID_TO)


async def test_to_with_display_name_sends_to_the_bare_address(relay: Relay) -> None:
    await relay.send(send_request(to="Jane Doe <jane@example.com>"))
    assert relay.sender.sent[0].recipient == "jane@example.com"


async def test_to_with_injected_header_is_invalid(relay: Relay) -> None:
    reply = await relay.send(send_request(to="jane@example.com\r\nBcc: evil@attacker.example"))
    assert reply == error(api.ERR_INVALID_TO)
    assert relay.sender.sent == []


async def test_to_is_checked_before_from(relay: Relay) -> None:
    assert await relay.send(send_request(to="nope", from_="nope")) == error(api.ERR_INVALID_TO)


# 5. from


async def test_unparseable_from(relay: Relay) -> None:
    assert await relay.send(send_request(from_="not an address")) == error(api.ERR_INVALID_FROM)


async def test_from_outside_allowlist(relay: Relay) -> None:
    reply = await relay.send(send_request(from_="x@linuxfoundation.org"))
    assert reply == error(api.ERR_FROM_DOMAIN_NOT_ALLOWED)


async def test_from_subdomain_is_not_allowed(relay: Relay) -> None:
    reply = await relay.send(send_request(from_="x@mail.lfx.linuxfoundation.org"))
    assert reply == error(api.ERR_FROM_DOMAIN_NOT_ALLOWED)


async def test_from_domain_matches_in_any_case(relay: Relay) -> None:
    await relay.send(send_request(from_="Team@LFX.LinuxFoundation.org"))
    assert relay.sender.sent[0].sender == "Team@LFX.LinuxFoundation.org"


async def test_from_with_empty_allowlist_is_not_allowed() -> None:
    relay = make_relay(replace(RULES, allowed_from_domains=()))
    reply = await relay.send(send_request(from_="x@lfx.linuxfoundation.org"))
    assert reply == error(api.ERR_FROM_DOMAIN_NOT_ALLOWED)


async def test_empty_allowlist_still_allows_the_default_from() -> None:
    relay = make_relay(replace(RULES, allowed_from_domains=()))
    assert (await relay.send(send_request()))["email_id"]


async def test_from_is_the_envelope_sender(relay: Relay) -> None:
    await relay.send(send_request(from_="events@lfx.linuxfoundation.org"))
    assert relay.sender.sent[0].sender == "events@lfx.linuxfoundation.org"


async def test_absent_from_uses_the_default(relay: Relay) -> None:
    await relay.send(send_request())
    sent = relay.sender.sent[0]
    assert sent.sender == "noreply@lfx.linuxfoundation.org"
    assert sent.parsed["From"] == "LFX Self Serve <noreply@lfx.linuxfoundation.org>"


async def test_empty_from_means_absent(relay: Relay) -> None:
    await relay.send(send_request(from_="", from_display_name="", reply_to="", group_id=""))
    sent = relay.sender.sent[0]
    assert sent.sender == "noreply@lfx.linuxfoundation.org"
    assert sent.parsed["From"] == "LFX Self Serve <noreply@lfx.linuxfoundation.org>"
    assert sent.parsed["Reply-To"] is None


async def test_null_optional_fields_mean_absent(relay: Relay) -> None:
    reply = await relay.send({**send_request(), "from": None, "reply_to": None, "group_id": None})
    assert reply["email_id"]
    assert relay.sender.sent[0].sender == "noreply@lfx.linuxfoundation.org"


async def test_display_name_overrides_the_default(relay: Relay) -> None:
    await relay.send(send_request(from_display_name="Events Team"))
    assert relay.sender.sent[0].parsed["From"].addresses[0].display_name == "Events Team"


async def test_from_is_checked_before_reply_to(relay: Relay) -> None:
    reply = await relay.send(send_request(from_="x@evil.example", reply_to="nope"))
    assert reply == error(api.ERR_FROM_DOMAIN_NOT_ALLOWED)


# 6. reply_to


async def test_unparseable_reply_to(relay: Relay) -> None:
    assert await relay.send(send_request(reply_to="a@b, c@d")) == error(api.ERR_INVALID_REPLY_TO)


async def test_reply_to_in_the_allowed_domain(relay: Relay) -> None:
    await relay.send(send_request(reply_to="help@linuxfoundation.org"))
    assert relay.sender.sent[0].parsed["Reply-To"] == "help@linuxfoundation.org"


async def test_reply_to_subdomain_is_allowed(relay: Relay) -> None:
    assert (await relay.send(send_request(reply_to="help@lists.linuxfoundation.org")))["email_id"]


async def test_reply_to_without_label_boundary_is_not_allowed(relay: Relay) -> None:
    reply = await relay.send(send_request(reply_to="x@evillinuxfoundation.org"))
    assert reply == error(api.ERR_REPLY_TO_DOMAIN_NOT_ALLOWED)


async def test_reply_to_with_empty_allowlist_is_not_allowed() -> None:
    relay = make_relay(replace(RULES, allowed_reply_to_domains=()))
    reply = await relay.send(send_request(reply_to="help@linuxfoundation.org"))
    assert reply == error(api.ERR_REPLY_TO_DOMAIN_NOT_ALLOWED)


async def test_reply_to_is_checked_before_email_enabled() -> None:
    relay = make_relay(replace(RULES, email_enabled=False))
    assert await relay.send(send_request(reply_to="nope")) == error(api.ERR_INVALID_REPLY_TO)


# 7. EMAIL_ENABLED


async def test_disabled_sending_answers_empty_ids() -> None:
    relay = make_relay(replace(RULES, email_enabled=False))
    assert await relay.send(send_request()) == SKIPPED
    assert relay.sender.sent == []
    assert relay.tracking.records == []


# 8. delivery


async def test_provider_refusal_is_delivery_failed() -> None:
    relay = make_relay()
    relay.sender.failure = PermanentFailure("550 no")
    assert await relay.send(send_request()) == error(api.ERR_DELIVERY_FAILED)
    assert relay.tracking.records == []
    assert relay.tracking.groups == {}


async def test_ambiguous_failure_is_delivery_failed() -> None:
    relay = make_relay()
    relay.sender.failure = AmbiguousFailure("dropped")
    assert await relay.send(send_request()) == error(api.ERR_DELIVERY_FAILED)


# success


async def test_success_reply_carries_a_uuid4_email_id(relay: Relay) -> None:
    reply = await relay.send(send_request())
    assert uuid.UUID(reply["email_id"]).version == 4


async def test_generated_group_id_is_a_uuid(relay: Relay) -> None:
    reply = await relay.send(send_request())
    assert uuid.UUID(reply["group_id"]).version == 4
    assert reply["group_id"] != reply["email_id"]


async def test_given_group_id_is_kept(relay: Relay) -> None:
    assert (await relay.send(send_request(group_id="batch-7")))["group_id"] == "batch-7"


async def test_envelope_recipient_is_the_recipient_only(relay: Relay) -> None:
    await relay.send(send_request(reply_to="help@linuxfoundation.org"))
    assert relay.sender.sent[0].recipient == "jane@example.com"


async def test_tracking_record_and_index_are_written_before_the_reply(relay: Relay) -> None:
    reply = await relay.send(send_request(group_id="batch-1"))
    (record,) = relay.tracking.records
    assert (record.email_id, record.group_id) == (reply["email_id"], "batch-1")
    assert (record.to, record.subject) == ("jane@example.com", "Hi")
    assert relay.tracking.groups == {"batch-1": [reply["email_id"]]}


async def test_sending_works_without_tracking() -> None:
    relay = make_relay(tracking=False)
    assert (await relay.send(send_request()))["email_id"]
    assert len(relay.sender.sent) == 1


async def test_transient_store_failure_is_retried() -> None:
    relay = make_relay()
    relay.tracking.failures_left = 2
    reply = await relay.send(send_request())
    assert [r.email_id for r in relay.tracking.records] == [reply["email_id"]]
    assert relay.tracking_failures == []


async def test_store_failing_for_good_still_answers_success() -> None:
    relay = make_relay(tracking_wait=0.2)
    relay.tracking.failures_left = 10**9
    reply = await relay.send(send_request())
    assert uuid.UUID(reply["email_id"])
    assert len(relay.sender.sent) == 1


async def test_store_failing_for_good_is_counted() -> None:
    relay = make_relay(tracking_wait=0.2)
    relay.tracking.failures_left = 10**9
    await relay.send(send_request())
    assert relay.tracking_failures == [None]


async def test_unexpected_store_exception_still_answers_success() -> None:
    relay = make_relay(tracking_wait=0.2)
    relay.tracking.failures_left = 10**9
    relay.tracking.failure = RuntimeError("bug in the store adapter")
    reply = await relay.send(send_request())
    assert "error" not in reply
    assert relay.tracking_failures == [None]


# tracking that outlives an outage: what is not stored in time goes to the pending writes


def failing_relay(*, capacity: int = 100) -> Relay:
    relay = make_relay(tracking_wait=0.2, pending=FakePending(capacity))
    relay.tracking.failures_left = 10**9
    return relay


async def test_write_not_stored_in_time_is_handed_to_the_pending_writes() -> None:
    relay = failing_relay()
    reply = await relay.send(send_request())
    assert relay.pending is not None
    assert [(d.record.email_id, d.record_stored) for d in relay.pending.writes] == [
        (reply["email_id"], False)
    ]


async def test_a_tracking_write_failing_as_its_wait_ends_answers_success_and_waits() -> None:
    """The record's write hangs (an election) and its recipient-index write
    fails just after TRACKING_WAIT ended: the email is out, so the caller
    gets its success and the write its place in the pending writes."""
    records, recipients = MemoryKeyValue(), MemoryKeyValue()
    records.hanging = True
    recipients.late_failure = 0.1
    store = TrackingStore(records, MemoryKeyValue(), recipients=recipients)
    relay = make_relay(tracking=store, tracking_wait=0.05, pending=FakePending())
    reply = await relay.send(send_request())
    assert "error" not in reply
    assert relay.pending is not None
    assert [d.record.email_id for d in relay.pending.writes] == [reply["email_id"]]


async def test_pending_write_goes_to_the_same_writer() -> None:
    relay = failing_relay()
    await relay.send(send_request())
    assert relay.pending is not None
    assert relay.pending.writes[0].writer is relay.tracking


async def test_write_handed_to_the_pending_writes_answers_success() -> None:
    relay = failing_relay()
    reply = await relay.send(send_request(group_id="batch-1"))
    assert reply == {"email_id": reply["email_id"], "group_id": "batch-1"}


async def test_write_handed_to_the_pending_writes_is_not_a_failure() -> None:
    relay = failing_relay()
    await relay.send(send_request())
    assert relay.tracking_failures == []


async def test_pending_write_remembers_the_record_was_stored() -> None:
    relay = make_relay(tracking_wait=0.2, pending=FakePending())
    relay.tracking.append_failures_left = 10**9
    await relay.send(send_request())
    assert relay.pending is not None
    assert [d.record_stored for d in relay.pending.writes] == [True]
    assert relay.tracking.creates == 1


async def test_full_pending_queue_counts_the_write_as_failed() -> None:
    relay = failing_relay(capacity=0)
    reply = await relay.send(send_request())
    assert "error" not in reply
    assert relay.tracking_failures == [None]


async def test_missing_bucket_goes_to_the_pending_writes_without_retrying() -> None:
    relay = make_relay(tracking_wait=60, pending=FakePending())
    relay.tracking.failures_left = 10**9
    relay.tracking.failure = BucketMissing("email-recipients does not exist")
    await relay.send(send_request())
    assert relay.tracking.creates == 1
    assert relay.pending is not None
    assert len(relay.pending.writes) == 1


async def test_request_deadline_passed_during_the_send_hands_tracking_straight_to_pending() -> None:
    relay = make_relay(pending=FakePending())
    relay.sender.delay = 0.2
    data = json.dumps(send_request()).encode()
    reply = json.loads(encode_reply(await relay.handler(data, Deadline.after(0.1))))
    assert "error" not in reply
    assert relay.tracking.records == []
    assert relay.pending is not None
    assert [d.record.email_id for d in relay.pending.writes] == [reply["email_id"]]


# the reply's bounded wait for tracking (TRACKING_WAIT)


async def timed_send(relay: Relay, deadline: Deadline | None = None) -> tuple[float, Any]:
    """The reply and the seconds it took."""
    started = anyio.current_time()
    reply = json.loads(
        encode_reply(await relay.handler(json.dumps(send_request()).encode(), deadline))
    )
    return anyio.current_time() - started, reply


async def test_store_not_answering_holds_the_reply_for_the_tracking_wait_only() -> None:
    relay = make_relay(tracking_wait=0.2, pending=FakePending())
    relay.tracking.electing = True
    took, reply = await timed_send(relay)
    assert "error" not in reply
    assert 0.2 <= took < 0.6


async def test_store_not_answering_within_the_tracking_wait_hands_the_write_to_pending() -> None:
    relay = make_relay(tracking_wait=0.2, pending=FakePending())
    relay.tracking.electing = True
    _, reply = await timed_send(relay)
    assert relay.pending is not None
    assert [d.record.email_id for d in relay.pending.writes] == [reply["email_id"]]


async def test_a_lost_store_reply_is_tried_again_within_the_tracking_wait() -> None:
    relay = make_relay(tracking_wait=5, pending=FakePending())
    relay.tracking.lost_replies = 1
    took, reply = await timed_send(relay)
    assert took < 1.0
    assert [r.email_id for r in relay.tracking.records] == [reply["email_id"]]
    assert relay.tracking.groups == {reply["group_id"]: [reply["email_id"]]}
    assert relay.pending is not None
    assert relay.pending.writes == []


async def test_tracking_wait_never_runs_past_the_request_deadline() -> None:
    relay = make_relay(tracking_wait=30, pending=FakePending())
    relay.tracking.electing = True
    took, reply = await timed_send(relay, Deadline.after(0.2))
    assert "error" not in reply
    assert took < 0.6


async def test_store_not_open_yet_hands_the_write_to_pending_without_waiting() -> None:
    once_open = TrackingOnceOpen()
    relay = make_relay(tracking=once_open, tracking_wait=30, pending=FakePending())
    took, reply = await timed_send(relay)
    assert "error" not in reply
    assert took < 0.5
    assert relay.pending is not None
    assert [(d.record.email_id, d.writer) for d in relay.pending.writes] == [
        (reply["email_id"], once_open)
    ]


async def test_writes_kept_before_the_store_opened_land_once_it_opens() -> None:
    once_open, store = TrackingOnceOpen(), FakeTracking()
    pending = PendingTrackingWrites(backoff_initial=0.001, backoff_max=0.01)
    handler = SendEmailHandler(RULES, FakeSender(), once_open, pending=pending)
    reply = json.loads(encode_reply(await handler(json.dumps(send_request(group_id="g")).encode())))
    async with anyio.create_task_group() as tg:
        tg.start_soon(pending.write_when_possible)
        once_open.open(store)
        await wait_for(lambda: len(pending) == 0, message="pending writes left")
        tg.cancel_scope.cancel()
    assert [r.email_id for r in store.records] == [reply["email_id"]]
    assert store.groups == {"g": [reply["email_id"]]}


async def test_full_pending_queue_logs_the_email_id_once(caplog: pytest.LogCaptureFixture) -> None:
    relay = failing_relay(capacity=0)
    with caplog.at_level(logging.ERROR, logger="emailrelay.handlers.send"):
        reply = await relay.send(send_request())
    assert [r.email_id for r in caplog.records] == [reply["email_id"]]  # type: ignore[attr-defined]


# deadlines


async def test_send_past_its_deadline_is_not_sent_and_counts_as_expired() -> None:
    sender, expired = FakeSender(), []
    handler = SendEmailHandler(RULES, sender, NoTracking(), on_expired=lambda: expired.append(None))
    reply = json.loads(
        encode_reply(await handler(json.dumps(send_request()).encode(), Deadline.after(-1)))
    )
    assert reply == error(api.ERR_DELIVERY_FAILED)
    assert (sender.sent, len(expired)) == ([], 1)


async def test_deadline_passing_during_the_send_counts_as_expired() -> None:
    sender, expired = FakeSender(failure=DeadlinePassed("late")), []
    handler = SendEmailHandler(RULES, sender, NoTracking(), on_expired=lambda: expired.append(None))
    reply = json.loads(
        encode_reply(await handler(json.dumps(send_request()).encode(), Deadline.after(60)))
    )
    assert reply == error(api.ERR_DELIVERY_FAILED)
    assert len(expired) == 1
