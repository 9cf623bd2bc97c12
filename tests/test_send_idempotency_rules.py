"""Issue 11's send-path rules, fast: SendEmailHandler over IdempotencyStore on the
in-memory KV, a fake suppression list and the fake sender of test_send_handler;
the poller's suppression adds over fakes. The same rules run end to end in
test_idempotency_e2e.py and test_suppression_e2e.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import pytest

from emailrelay import api
from emailrelay.deadline import Deadline
from emailrelay.engagement.handler import EventHandler, Outcome
from emailrelay.handlers.replies import encode_reply
from emailrelay.handlers.send import NoTracking, SendEmailHandler
from emailrelay.mail.errors import AmbiguousFailure, TransientFailure
from emailrelay.store.idempotency import IdempotencyStore, Reserved, request_fingerprint
from emailrelay.store.kv import StoreError
from emailrelay.store.suppressions import Suppression
from tests.support.fakes import FakeSender, FakeStore, MemoryKeyValue, message
from tests.support.send_requests import RULES, send_request
from tests.support.ses_events import SES_EXAMPLES, sns_body
from tests.support.waiting import wait_for

KEY = "order-42"


@dataclass
class FakeSuppressions:
    addresses: set[str] = field(default_factory=set)
    failure: Exception | None = None
    added: list[Suppression] = field(default_factory=list)

    async def is_suppressed(self, address: str) -> bool:
        await anyio.lowlevel.checkpoint()
        if self.failure is not None:
            raise self.failure
        return address.lower() in self.addresses

    async def add(self, suppression: Suppression) -> bool:
        await anyio.lowlevel.checkpoint()
        if self.failure is not None:
            raise self.failure
        self.added.append(suppression)
        return True


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Setup:
    handler: SendEmailHandler
    sender: FakeSender
    kv: MemoryKeyValue
    clock: Clock
    suppressions: FakeSuppressions

    async def send(
        self, deadline: Deadline | None = None, headers: dict[str, str] | None = None, **body: Any
    ) -> dict[str, Any]:
        data = json.dumps(send_request(**body)).encode()
        reply: dict[str, Any] = json.loads(
            encode_reply(await self.handler(data, deadline, headers))
        )
        return reply


def setup(email_enabled: bool = True, send_timeout: float = 30.0) -> Setup:
    sender, kv, clock, suppressions = FakeSender(), MemoryKeyValue(), Clock(), FakeSuppressions()
    store = IdempotencyStore(kv, stale_after=send_timeout + 15, wall_clock=clock)
    handler = SendEmailHandler(
        replace(RULES, email_enabled=email_enabled),
        sender,
        NoTracking(),
        reservations=store,
        suppressions=suppressions,
    )
    return Setup(handler, sender, kv, clock, suppressions)


# --- idempotency --------------------------------------------------------------------


async def test_store_failure_at_reservation_fails_the_send_unsent() -> None:
    relay = setup()
    relay.kv.closed = True
    assert await relay.send(idempotency_key=KEY) == {"error": api.ERR_DELIVERY_FAILED}
    assert relay.sender.sent == []


async def test_without_a_key_a_failing_idempotency_store_changes_nothing() -> None:
    relay = setup()
    relay.kv.closed = True
    assert "email_id" in await relay.send()


async def test_a_key_whose_owner_vanished_reads_as_outcome_unknown() -> None:
    relay = setup(send_timeout=30)
    store = IdempotencyStore(relay.kv, stale_after=45, wall_clock=relay.clock)
    fingerprint = request_fingerprint(api.SendEmailRequest.model_validate(send_request()))
    assert isinstance(await store.reserve(KEY, fingerprint), Reserved)  # then crashed
    relay.clock.now += 46
    assert await relay.send(idempotency_key=KEY) == {"error": api.ERR_DELIVERY_OUTCOME_UNKNOWN}
    assert relay.sender.sent == []


async def test_a_key_in_progress_past_the_deadline_answers_delivery_failed() -> None:
    relay = setup()
    relay.sender.delay = 5
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: relay.send(idempotency_key=KEY))
        await wait_for(lambda: relay.kv.entries, message="the first send reserved no key")
        waited = await relay.send(Deadline.after(0.3), idempotency_key=KEY)
        tg.cancel_scope.cancel()
    assert waited == {"error": api.ERR_DELIVERY_FAILED}


async def test_a_request_past_its_deadline_does_not_reserve_the_key() -> None:
    relay = setup()
    assert await relay.send(Deadline.after(-1), idempotency_key=KEY) == {
        "error": api.ERR_DELIVERY_FAILED
    }
    assert relay.kv.entries == {}


async def test_an_ambiguous_send_answers_outcome_unknown_only_with_a_key() -> None:
    relay = setup()
    relay.sender.failure = AmbiguousFailure("dropped after DATA")
    assert await relay.send(idempotency_key=KEY) == {"error": api.ERR_DELIVERY_OUTCOME_UNKNOWN}
    assert await relay.send() == {"error": api.ERR_DELIVERY_FAILED}


async def test_a_transient_failure_releases_the_key() -> None:
    relay = setup()
    relay.sender.failure = TransientFailure("421")
    assert await relay.send(idempotency_key=KEY) == {"error": api.ERR_DELIVERY_FAILED}
    relay.sender.failure = None
    assert "email_id" in await relay.send(idempotency_key=KEY)


async def test_the_header_name_is_matched_case_insensitively() -> None:
    relay = setup()
    first = await relay.send(idempotency_key=KEY)
    again = await relay.send(headers={"idempotency-key": KEY})
    assert again == first


# --- suppression ----------------------------------------------------------------------


async def test_a_suppressed_recipient_is_refused_before_email_enabled_is_checked() -> None:
    relay = setup(email_enabled=False)
    relay.suppressions.addresses.add(send_request()["to"])
    assert await relay.send() == {"error": api.ERR_RECIPIENT_SUPPRESSED}


async def test_with_sending_off_an_address_not_suppressed_is_skipped() -> None:
    relay = setup(email_enabled=False)
    assert await relay.send() == {"email_id": "", "group_id": ""}


async def test_an_unreadable_suppression_list_does_not_block_the_send() -> None:
    relay = setup()
    relay.suppressions.failure = StoreError("down")
    assert "email_id" in await relay.send()
    assert len(relay.sender.sent) == 1


async def test_a_suppressed_recipient_does_not_reserve_the_key() -> None:
    relay = setup()
    relay.suppressions.addresses.add(send_request()["to"])
    await relay.send(idempotency_key=KEY)
    assert relay.kv.entries == {}


# --- the poller's suppression adds ------------------------------------------------------


def permanent_bounce(address: str) -> str:
    event = json.loads(json.dumps(SES_EXAMPLES["Bounce"]))
    event["bounce"]["bouncedRecipients"][0]["emailAddress"] = address
    return sns_body(event)


def poller_with(suppressions: FakeSuppressions) -> EventHandler:
    return EventHandler(FakeStore(None), 5, suppressions=suppressions)


async def test_a_bounce_without_a_tracking_header_still_suppresses_and_is_deleted() -> None:
    suppressions = FakeSuppressions()
    _, outcome = await poller_with(suppressions).handle(message(permanent_bounce("x@example.org")))
    assert [s.address for s in suppressions.added] == ["x@example.org"]
    assert outcome == Outcome.SKIPPED


async def test_a_failed_suppression_add_keeps_the_message_for_redelivery() -> None:
    suppressions = FakeSuppressions(failure=StoreError("down"))
    _, outcome = await poller_with(suppressions).handle(message(permanent_bounce("x@example.org")))
    assert outcome == Outcome.RETRY


async def test_an_open_event_suppresses_nobody() -> None:
    suppressions = FakeSuppressions()
    body = sns_body(json.loads(json.dumps(SES_EXAMPLES["Open"])))
    await poller_with(suppressions).handle(message(body))
    assert suppressions.added == []


# --- keyed sends during a JetStream election ----------------------------------------


class ElectingKeyValue(MemoryKeyValue):
    """Reads answer (a follower serves them); writes hang while ``electing``,
    as JetStream's do while the stream has no leader."""

    def __init__(self) -> None:
        super().__init__()
        self.electing = False

    async def create(self, key: str, value: bytes) -> int:
        if self.electing:
            await anyio.sleep_forever()
        return await super().create(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        if self.electing:
            await anyio.sleep_forever()
        return await super().update(key, value, last)


def electing_setup() -> tuple[Setup, ElectingKeyValue]:
    relay = setup()
    kv = ElectingKeyValue()
    relay.handler.start_reservations(IdempotencyStore(kv, stale_after=45))
    return relay, kv


async def timed(relay: Setup, **body: Any) -> tuple[float, dict[str, Any]]:
    started = anyio.current_time()
    reply = await relay.send(**body)
    return anyio.current_time() - started, reply


async def test_a_reservation_not_made_within_its_bound_answers_delivery_failed_unsent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("emailrelay.handlers.send.RESERVATION_WAIT", 0.2)
    relay, kv = electing_setup()
    kv.electing = True
    took, reply = await timed(relay, idempotency_key=KEY)
    assert reply == {"error": api.ERR_DELIVERY_FAILED}
    assert relay.sender.sent == []
    assert 0.2 <= took < 0.6


async def test_a_reservation_is_bounded_by_the_request_deadline_too() -> None:
    relay, kv = electing_setup()
    kv.electing = True
    started = anyio.current_time()
    reply = await relay.send(Deadline.after(0.2), idempotency_key=KEY)
    assert reply == {"error": api.ERR_DELIVERY_FAILED}
    assert anyio.current_time() - started < 0.6


async def test_a_key_refused_during_an_election_sends_once_retried_after_it() -> None:
    relay, kv = electing_setup()
    kv.electing = True
    with anyio.fail_after(5):
        assert await relay.send(Deadline.after(0.2), idempotency_key=KEY) == {
            "error": api.ERR_DELIVERY_FAILED
        }
    kv.electing = False
    assert "email_id" in await relay.send(idempotency_key=KEY)
    assert len(relay.sender.sent) == 1


async def test_an_outcome_not_stored_within_its_bound_still_answers_the_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("emailrelay.handlers.send.SETTLE_WAIT", 0.2)
    relay, kv = electing_setup()

    async def deliver_then_lose_the_leader(*args: Any) -> None:
        kv.electing = True

    relay.sender.send = deliver_then_lose_the_leader  # type: ignore[method-assign]
    took, reply = await timed(relay, idempotency_key=KEY)
    assert "email_id" in reply
    assert 0.2 <= took < 0.6
