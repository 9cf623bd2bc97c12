"""Provider-rate awareness (emailrelay.mail.rate): the throttle classifier,
the token bucket's arithmetic on a fake clock, its waiting on trio's
MockClock, and the adaptive (AIMD) controller."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from emailrelay.deadline import DeadlinePassed
from emailrelay.mail.rate import (
    AdaptiveRate,
    DailyQuotaExceeded,
    Throttled,
    TokenBucket,
    classify_throttle,
)

# --- classify_throttle ------------------------------------------------------------


def test_ses_maximum_sending_rate_is_throttled() -> None:
    message = "Throttling failure: Maximum sending rate exceeded."
    assert classify_throttle(454, message) == Throttled(454, message)


def test_ses_daily_quota_is_daily_quota_exceeded() -> None:
    message = "Throttling failure: Daily message quota exceeded."
    assert classify_throttle(454, message) == DailyQuotaExceeded(454, message)


def test_daily_quota_is_recognised_whatever_the_code() -> None:
    assert isinstance(classify_throttle(554, "Daily message quota exceeded"), DailyQuotaExceeded)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (421, "4.7.0 Too many messages, slow down"),
        (450, "4.7.1 Rate limit exceeded, try again"),
        (451, "4.7.650 The mail server has been temporarily rate limited"),
        (421, "4.7.28 Our system has detected an unusual rate of unsolicited mail"),
        (452, "4.3.1 Throttled"),
    ],
)
def test_other_providers_4xx_throttling_texts_are_throttled(code: int, message: str) -> None:
    assert isinstance(classify_throttle(code, message), Throttled)


def test_a_5xx_with_a_throttling_text_is_not_throttled() -> None:
    assert classify_throttle(554, "Message rejected: rate limit exceeded") is None


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (451, "4.3.0 Temporary local problem - please try again later"),
        (450, "4.2.1 Mailbox busy"),
        (550, "5.1.1 User unknown"),
    ],
)
def test_other_replies_are_not_throttling(code: int, message: str) -> None:
    assert classify_throttle(code, message) is None


# --- TokenBucket arithmetic (fake clock: times are arguments) ------------------


def test_unlimited_bucket_never_waits() -> None:
    bucket = TokenBucket(0)
    assert [bucket.take(now=0) for _ in range(1000)] == [0.0] * 1000


def test_burst_is_served_without_waiting() -> None:
    bucket = TokenBucket(10, burst=3)
    assert [bucket.take(now=0) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_beyond_the_burst_each_send_waits_its_turn() -> None:
    bucket = TokenBucket(10, burst=1)
    assert bucket.take(now=0) == 0.0
    assert bucket.take(now=0) == pytest.approx(0.1)
    assert bucket.take(now=0) == pytest.approx(0.2)


def test_tokens_refill_at_the_rate() -> None:
    bucket = TokenBucket(10, burst=1)
    bucket.take(now=0)
    assert bucket.take(now=0.1) == pytest.approx(0.0)


def test_idle_time_earns_no_more_than_the_burst() -> None:
    bucket = TokenBucket(10, burst=2)
    waits = [bucket.take(now=3600) for _ in range(3)]
    assert waits[:2] == [0.0, 0.0]
    assert waits[2] == pytest.approx(0.1)


def test_a_token_that_would_come_after_until_is_not_booked() -> None:
    bucket = TokenBucket(1, burst=1)
    bucket.take(now=0)
    assert bucket.take(now=0, until=0.5) is None
    assert bucket.take(now=0, until=1.0) == pytest.approx(1.0)  # the refusal booked nothing


def test_rate_over_a_long_run_matches_the_setting() -> None:
    bucket = TokenBucket(5, burst=1)
    now = 0.0
    for _ in range(501):
        now += bucket.take(now) or 0.0
    assert now == pytest.approx(100.0)


def test_lowering_the_rate_slows_the_next_sends() -> None:
    bucket = TokenBucket(10, burst=1)
    bucket.take(now=0)
    bucket.set_rate(1, now=0)
    assert bucket.take(now=0) == pytest.approx(1.0)


# --- TokenBucket.acquire (trio MockClock) ---------------------------------


async def test_acquire_waits_for_the_next_token(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(2, burst=1, now=trio.current_time())
    start = trio.current_time()
    await bucket.acquire(until=start + 10)
    await bucket.acquire(until=start + 10)
    assert trio.current_time() - start == pytest.approx(0.5)


async def test_acquire_fails_at_once_when_no_token_comes_before_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(1, burst=1, now=trio.current_time())
    await bucket.acquire(until=trio.current_time() + 10)
    start = trio.current_time()
    with pytest.raises(DeadlinePassed):
        await bucket.acquire(until=start + 0.5)
    assert trio.current_time() == start


async def test_concurrent_acquirers_are_spread_at_the_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(10, burst=1, now=trio.current_time())
    start = trio.current_time()
    done: list[float] = []

    async def send() -> None:
        await bucket.acquire(until=start + 60)
        done.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(send)
    assert sorted(done) == pytest.approx([n / 10 for n in range(20)])


async def test_a_cancelled_waiter_gives_its_token_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(1, burst=1, now=trio.current_time())
    start = trio.current_time()
    await bucket.acquire(until=start + 60)
    with trio.move_on_after(0.5):
        await bucket.acquire(until=start + 60)  # booked for t=1, cancelled
    await bucket.acquire(until=start + 60)
    assert trio.current_time() - start == pytest.approx(1.0)


# --- AdaptiveRate ----------------------------------------------------------------


def controller(max_rate: float = 10.0) -> AdaptiveRate:
    return AdaptiveRate(TokenBucket(max_rate), max_rate, increase=1.0)


def test_throttling_halves_the_rate() -> None:
    rate = controller()
    rate.throttled(now=0)
    assert rate.rate == 5.0


def test_a_burst_of_throttling_replies_lowers_the_rate_once_per_cooldown() -> None:
    rate = controller()
    for _ in range(10):
        rate.throttled(now=0.2)
    assert rate.rate == 5.0
    rate.throttled(now=1.2)
    assert rate.rate == 2.5


def test_the_rate_never_goes_below_the_minimum() -> None:
    rate = controller()
    for second in range(100):
        rate.throttled(now=float(second))
    assert rate.rate == 0.1


def test_clean_replies_raise_the_rate_additively_and_slowly() -> None:
    rate = controller()
    rate.throttled(now=0)
    rate.accepted(now=0.5)  # too soon after the decrease
    assert rate.rate == 5.0
    for second in range(1, 4):
        rate.accepted(now=float(second))
        rate.accepted(now=second + 0.5)  # more replies in the same second add nothing
    assert rate.rate == 8.0


def test_the_rate_never_rises_above_the_configured_maximum() -> None:
    rate = controller()
    rate.throttled(now=0)
    for second in range(1, 100):
        rate.accepted(now=float(second))
    assert rate.rate == 10.0


def test_unlimited_rate_is_left_alone() -> None:
    rate = AdaptiveRate(TokenBucket(0), 0)
    rate.throttled(now=0)
    assert rate.rate == 0
