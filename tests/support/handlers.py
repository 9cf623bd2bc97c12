"""Shared pieces of the hostile-input tests: the three handlers wired over
in-memory stores and a sender that only records, and a key-value fake that
remembers every key it was asked for (to prove what would reach a subject)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from emailrelay.deadline import Deadline
from emailrelay.handlers.analytics import GetEngagementAnalyticsHandler
from emailrelay.handlers.replies import Reply, encode_reply
from emailrelay.handlers.send import SendEmailHandler, SendRules
from emailrelay.handlers.status import GetEmailStatusHandler
from emailrelay.store.kv import Entry
from emailrelay.store.tracking import TrackingStore
from tests.support.fakes import MemoryKeyValue
from tests.support.send_requests import NATS_MAX_PAYLOAD, RULES


class KeyRecordingKeyValue(MemoryKeyValue):
    """A :class:`MemoryKeyValue` that remembers every key a call named."""

    def __init__(self) -> None:
        super().__init__()
        self.keys_asked: list[str] = []

    async def get(self, key: str) -> Entry | None:
        self.keys_asked.append(key)
        return await super().get(key)

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, Entry]:
        self.keys_asked.extend(keys)
        return await super().get_many(keys)

    async def create(self, key: str, value: bytes) -> int:
        self.keys_asked.append(key)
        return await super().create(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.keys_asked.append(key)
        return await super().update(key, value, last)


@dataclass
class RecordingSender:
    messages: list[bytes] = field(default_factory=list)

    async def send(self, sender: str, recipient: str, message: bytes, deadline: Deadline) -> None:
        self.messages.append(message)


@dataclass
class Handlers:
    """send, status and analytics over one in-memory tracking store."""

    records: KeyRecordingKeyValue
    groups: KeyRecordingKeyValue
    sender: RecordingSender
    send: Callable[[bytes], Awaitable[bytes]]
    status: Callable[[bytes], Awaitable[bytes]]
    analytics: Callable[[bytes], Awaitable[bytes]]

    @property
    def keys_asked(self) -> list[str]:
        return self.records.keys_asked + self.groups.keys_asked


def handlers(rules: SendRules = RULES) -> Handlers:
    records, groups = KeyRecordingKeyValue(), KeyRecordingKeyValue()
    store = TrackingStore(records, groups)
    sender = RecordingSender()
    return Handlers(
        records=records,
        groups=groups,
        sender=sender,
        send=encoded(SendEmailHandler(rules, sender, store)),
        status=encoded(GetEmailStatusHandler(store, lambda: NATS_MAX_PAYLOAD)),
        analytics=encoded(GetEngagementAnalyticsHandler(store)),
    )


def encoded(handler: Callable[[bytes], Awaitable[Reply]]) -> Callable[[bytes], Awaitable[bytes]]:
    """``handler`` answering the body the request loop would put on the wire."""

    async def handle(data: bytes) -> bytes:
        return encode_reply(await handler(data))

    return handle
