"""What the SMTP server received, checked against the callers' view and the KV store.

Every fault test ends with the same questions, answered from the raw bytes
the SMTP server received (never a re-parsed message) and from the buckets:

- was any email sent twice (same tracking email id, or same request number)?
- does every email that reached the SMTP server have its tracking record and
  its group-index entry (a SIGKILLed relay's in-flight sends excepted: counted)?
- did a caller that was told "no" (an error reply, no responders) get its
  email anyway, and did any email go out after its caller gave up?

Which relay sent an email shows in its ``From`` display name: each fault
relay runs with its own ``DEFAULT_SMTP_FROM_DISPLAY_NAME``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import nats.js.errors

from emailrelay import api
from emailrelay.store.keys import group_key, index_page_key
from tests.faults import figures
from tests.faults.load import SUBJECT_PREFIX, LoadResult, Request, percentile, send_number
from tests.support.nats_client import SyncNats
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

_SUBJECT = re.compile(rb"^Subject: ([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
_FROM_NAME = re.compile(rb'^From: "?([^"<\r\n]*?)"? <', re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Delivered:
    """One message the SMTP server accepted, as read from its raw header lines."""

    email_id: str
    group_id: str
    number: int | None
    sender_name: str
    received_at: float


def delivered(smtp: SmtpServer, run: str) -> list[Delivered]:
    """The messages of this run (subject ``fault <run> #n``) the SMTP server accepted."""
    found = []
    marker = f"{SUBJECT_PREFIX} {run} #"
    for message in smtp.messages:
        head, _, _ = message.raw.partition(b"\r\n\r\n")
        subject = _SUBJECT.search(head)
        if subject is None or not subject.group(1).decode(errors="replace").startswith(marker):
            continue
        number = subject.group(1).decode().rpartition("#")[2]
        group_id, email_id = message.tracking() or ("", "")
        sender = _FROM_NAME.search(head)
        found.append(
            Delivered(
                email_id=email_id,
                group_id=group_id,
                number=int(number) if number.isdigit() else None,
                sender_name=sender.group(1).decode() if sender else "",
                received_at=message.received_at,
            )
        )
    return found


def _repeated(values: Iterable[object]) -> list[object]:
    return sorted((v for v, n in Counter(values).items() if n > 1), key=str)


@dataclass
class Audit:
    delivered: list[Delivered]
    missing_records: list[Delivered] = field(default_factory=list)
    missing_index: list[Delivered] = field(default_factory=list)

    @property
    def duplicate_email_ids(self) -> list[object]:
        return _repeated(d.email_id for d in self.delivered)

    @property
    def duplicate_requests(self) -> list[object]:
        return _repeated(d.number for d in self.delivered if d.number is not None)

    def untracked(self) -> list[Delivered]:
        """Delivered emails missing their record or their index entry (each once)."""
        seen = {d.email_id: d for d in self.missing_records + self.missing_index}
        return list(seen.values())


def group_index(kv: SyncNats, group_id: str) -> list[str] | None:
    """Every id in the group's index (head and overflow pages); None: no index."""
    try:
        head = kv.kv_get(api.GROUP_INDEX_BUCKET, group_key(group_id))
    except nats.js.errors.BucketNotFoundError:
        return None
    if head is None:
        return None
    ids: list[str] = list(json.loads(head))
    page = 1
    while (more := kv.kv_get(api.GROUP_INDEX_BUCKET, index_page_key(group_id, page))) is not None:
        ids.extend(json.loads(more))
        page += 1
    return ids


def has_record(kv: SyncNats, email_id: str) -> bool:
    try:
        return kv.kv_get(api.RECIPIENTS_BUCKET, email_id) is not None
    except nats.js.errors.BucketNotFoundError:
        return False


def audit(smtp: SmtpServer, kv: SyncNats, run: str) -> Audit:
    """Check this run's delivered emails against both buckets."""
    result = Audit(delivered(smtp, run))
    indexes: dict[str, set[str]] = {}
    for message in result.delivered:
        if message.group_id not in indexes:
            indexes[message.group_id] = set(group_index(kv, message.group_id) or [])
        if message.email_id not in indexes[message.group_id]:
            result.missing_index.append(message)
        if not has_record(kv, message.email_id):
            result.missing_records.append(message)
    return result


def audit_when_tracked(
    smtp: SmtpServer,
    kv: SyncNats,
    run: str,
    *,
    timeout: float = 30.0,
    excused: Callable[[Delivered], bool] = lambda d: False,
) -> Audit:
    """Audit once every delivered email not ``excused`` is tracked, or at ``timeout``
    (tracking written later, from a pending queue, counts)."""
    latest: list[Audit] = []

    def tracked() -> bool:
        latest[:] = [audit(smtp, kv, run)]
        return not [d for d in latest[0].untracked() if not excused(d)]

    # On timeout the caller asserts on the audit, which says what is missing.
    with contextlib.suppress(AssertionError):
        wait_until(tracked, timeout=timeout, interval=0.5)
    return latest[0]


@dataclass
class CallerCheck:
    """The callers' view against the SMTP server's."""

    more_than_one_reply: list[Request]
    never_sent: list[Request]
    refused_but_delivered: list[tuple[Request, Delivered]]
    wrong_email_id: list[tuple[Request, Delivered]]
    delivered_after_caller_gave_up: list[tuple[Request, Delivered]]
    delivered_without_caller: list[Delivered]


GAVE_UP_TOLERANCE = 1.0
"""Seconds an SMTP transaction that started before the caller's deadline may take
to complete: the rule is "no transaction starts after the deadline"."""


def check_callers(result: LoadResult, deliveries: list[Delivered]) -> CallerCheck:
    """Each delivery against every attempt of its request (a keyed caller retries
    with the same key, so one request number may have several attempts): it is
    accounted for by a success naming its email id, an ``outcome unknown``, or
    an attempt whose caller was still waiting when the transaction started."""
    attempts: dict[int, list[Request]] = {}
    for request in result.requests:
        if (number := send_number(request)) is not None:
            attempts.setdefault(number, []).append(request)
    refused, wrong_id, after, orphans = [], [], [], []
    for message in deliveries:
        tries = attempts.get(message.number, []) if message.number is not None else []
        if not tries:
            orphans.append(message)
            continue
        successes = [r for r in tries if r.outcome == "ok"]
        gave_up = [r for r in tries if r.outcome in ("timeout", "publish failed")]
        if successes:
            named = [r for r in successes if r.body.get("email_id") != message.email_id]
            wrong_id += [(r, message) for r in named]
        elif any(r.outcome == api.ERR_DELIVERY_OUTCOME_UNKNOWN for r in tries):
            pass  # the contract's answer for "it may have gone out": not a refusal
        elif gave_up:
            last = max(gave_up, key=lambda r: r.deadline)
            if message.received_at > last.deadline + GAVE_UP_TOLERANCE:
                after.append((last, message))
        else:
            refused.append((tries[-1], message))
    return CallerCheck(
        more_than_one_reply=result.more_than_one_relay_reply(),
        never_sent=result.unanswered(),
        refused_but_delivered=refused,
        wrong_email_id=wrong_id,
        delivered_after_caller_gave_up=after,
        delivered_without_caller=orphans,
    )


def describe(requests: Iterable[Request], limit: int = 5) -> str:
    """A few requests, for assertion messages."""
    shown = []
    for r in list(requests)[:limit]:
        replies = [(round(x.at - r.sent_at, 2), x.data[:80]) for x in r.replies]
        shown.append(f"#{r.number} {r.outcome} replies={replies}")
    return "; ".join(shown)


def assert_intact(
    found: Audit,
    callers: CallerCheck,
    *,
    excused: Callable[[Delivered], bool] = lambda d: False,
) -> None:
    """The promises every fault must keep (see the module docstring)."""
    assert found.duplicate_email_ids == [], f"emails sent twice: {found.duplicate_email_ids}"
    assert found.duplicate_requests == [], f"requests sent twice: {found.duplicate_requests}"
    untracked = [d for d in found.untracked() if not excused(d)]
    assert untracked == [], (
        f"{len(untracked)} delivered emails lack their record "
        f"({len(found.missing_records)}) or group-index entry ({len(found.missing_index)}): "
        f"{untracked[:5]}"
    )
    assert callers.more_than_one_reply == [], (
        f"requests answered more than once: {describe(callers.more_than_one_reply)}"
    )
    assert callers.never_sent == [], f"{len(callers.never_sent)} requests never sent"
    assert callers.refused_but_delivered == [], (
        "callers told no (error reply or no responders) whose email went out anyway: "
        f"{describe(r for r, _ in callers.refused_but_delivered)}"
    )
    assert callers.wrong_email_id == [], "a success reply named another email id than was sent"
    assert callers.delivered_without_caller == [], "emails no request of this run asked for"
    assert callers.delivered_after_caller_gave_up == [], (
        f"{len(callers.delivered_after_caller_gave_up)} emails delivered after their caller "
        "gave up (a caller that retries sends them twice): "
        + ", ".join(
            f"#{r.number} {m.received_at - r.deadline:.1f}s late"
            for r, m in callers.delivered_after_caller_gave_up[:5]
        )
    )


def record_load_figures(result: LoadResult, found: Audit) -> None:
    """The figures every fault test prints: what the callers saw, what went out."""
    outcomes = result.outcomes()
    figures.record("requests", len(result.requests))
    for outcome, count in sorted(outcomes.items()):
        figures.record(f"outcome {outcome}", count)
    figures.record("requests lost to caller timeouts", outcomes.get("timeout", 0))
    figures.record("late relay replies (after the caller gave up)", len(result.late_replies()))
    figures.record("emails delivered", len(found.delivered))
    figures.record("longest gap between successes", result.longest_gap_between_successes(), "s")
    latencies = result.latencies()
    if latencies:
        figures.record("reply latency p50", percentile(latencies, 0.5), "s")
        figures.record("reply latency max", latencies[-1], "s")
