"""After a run: did every success arrive, and was it recorded and indexed?

Three sources, all from outside the relay:

- the sink's log of ``X-LFX-TRACKING-ID`` values (the email id is the part
  after the last ``/``);
- the ``email-recipients`` bucket, read directly (its key is the email id,
  part of the wire contract);
- the group's index, asked of the relay through the contract subjects:
  analytics for ``total_sent`` (ids in the index), then status pages
  (``limit``/``offset``) for the ids, in index order. Asking the relay keeps
  this check independent of how the index is laid out in KV.

:func:`check_deliveries` is the pure part: it takes what was collected and
says what is missing; :func:`collect` does the asking.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import nats
import nats.js.errors
from nats.aio.client import Client

RECIPIENTS_BUCKET = "email-recipients"
STATUS_SUBJECT = "lfx.email-service.get_email_status"
ANALYTICS_SUBJECT = "lfx.email-service.get_email_engagement_analytics"
STATUS_PAGE = 500
_GETS_IN_FLIGHT = 64


def email_id_of(tracking_value: str) -> str:
    """The email id in a tracking header value: after the last ``/`` (or all of it)."""
    return tracking_value.rsplit("/", 1)[-1]


@dataclass
class Verification:
    """What is missing for the successes of one run (empty lists: all there)."""

    successes: int
    missing_at_sink: list[str] = field(default_factory=list)
    missing_record: list[str] = field(default_factory=list)
    missing_from_index: list[str] = field(default_factory=list)
    indexed_twice: list[str] = field(default_factory=list)
    index_total: int | None = None

    @property
    def ok(self) -> bool:
        return not (
            self.missing_at_sink
            or self.missing_record
            or self.missing_from_index
            or self.indexed_twice
        )

    def summary(self) -> str:
        if self.ok:
            return f"all {self.successes} delivered, recorded and indexed"
        problems = [
            f"{len(ids)} {what} (e.g. {ids[0]})"
            for what, ids in (
                ("not at the SMTP server", self.missing_at_sink),
                ("without a record", self.missing_record),
                ("missing from the group index", self.missing_from_index),
                ("indexed more than once", self.indexed_twice),
            )
            if ids
        ]
        return f"of {self.successes} successes: " + "; ".join(problems)


def check_deliveries(
    success_ids: Sequence[str],
    sink_values: Iterable[str],
    record_ids: Iterable[str],
    index_ids: Sequence[str],
    index_total: int | None = None,
) -> Verification:
    """Every success id must be at the sink, have a record, and be in the index exactly once."""
    delivered = {email_id_of(value) for value in sink_values}
    recorded = set(record_ids)
    counts = Counter(index_ids)
    return Verification(
        successes=len(success_ids),
        missing_at_sink=[i for i in success_ids if i not in delivered],
        missing_record=[i for i in success_ids if i not in recorded],
        missing_from_index=[i for i in success_ids if counts[i] == 0],
        indexed_twice=sorted(i for i, count in counts.items() if count > 1),
        index_total=index_total,
    )


async def _request(nc: Client, subject: str, body: dict[str, object]) -> object:
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=30)
    return json.loads(msg.data)


async def recorded_ids(nc: Client, email_ids: Sequence[str]) -> set[str]:
    """The ids among ``email_ids`` that have a record in ``email-recipients``."""
    kv = await nc.jetstream().key_value(RECIPIENTS_BUCKET)
    found: set[str] = set()
    limit = asyncio.Semaphore(_GETS_IN_FLIGHT)

    async def get(email_id: str) -> None:
        async with limit:
            try:
                entry = await kv.get(email_id)
            except nats.js.errors.KeyNotFoundError:
                return
        if entry.value:
            found.add(email_id)

    await asyncio.gather(*(get(i) for i in email_ids))
    return found


async def indexed_ids(nc: Client, group_id: str) -> tuple[list[str], int | None]:
    """The group's ids in index order (from status pages) and analytics' ``total_sent``."""
    analytics = await _request(nc, ANALYTICS_SUBJECT, {"group_id": group_id})
    if not isinstance(analytics, dict) or "total_sent" not in analytics:
        return [], None
    total = int(analytics["total_sent"])
    ids: list[str] = []
    for offset in range(0, total, STATUS_PAGE):
        page = await _request(
            nc, STATUS_SUBJECT, {"group_id": group_id, "limit": STATUS_PAGE, "offset": offset}
        )
        if not isinstance(page, list):
            raise TypeError(f"status page at {offset} answered {page!r}")
        ids.extend(str(record.get("email_id")) for record in page)
    return ids, total


async def collect(
    url: str, group_id: str, success_ids: Sequence[str], sink_values: Iterable[str]
) -> Verification:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        records = await recorded_ids(nc, success_ids)
        index, total = await indexed_ids(nc, group_id)
    finally:
        await nc.drain()
    return check_deliveries(success_ids, sink_values, records, index, total)


EVENTS_STREAM = "EMAIL_EVENTS"
SENT_SUBJECT = "lfx.email-service.events.sent"


async def sent_events(url: str, email_ids: Sequence[str]) -> Counter[str]:
    """How many ``sent`` events the EMAIL_EVENTS stream holds for each of
    ``email_ids`` (a run with EVENTS_STREAM_ENABLED=true: one each)."""
    wanted = set(email_ids)
    counts: Counter[str] = Counter()
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        subscription = await js.pull_subscribe(SENT_SUBJECT, durable=None, stream=EVENTS_STREAM)
        try:
            while True:
                try:
                    messages = await subscription.fetch(500, timeout=2)
                except TimeoutError:  # nats-py raises its own or asyncio's
                    return counts
                for msg in messages:
                    email_id = json.loads(msg.data).get("email_id")
                    if email_id in wanted:
                        counts[email_id] += 1
                    await msg.ack()
        finally:
            await subscription.unsubscribe()
    finally:
        await nc.close()
