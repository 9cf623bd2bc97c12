"""``lfx.email-service.get_email_status``: one record by ``email_id``, or a
group's records in index order by ``group_id`` (optionally one page of them).

A group reply is built from concurrent batch reads of the records; it stops
reading as soon as the reply can no longer fit in one NATS message and then
answers ``group too large for one reply, page with limit and offset``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from emailrelay import api
from emailrelay.handlers.replies import (
    NO_GROUP,
    NO_RECORD,
    EncodedRecords,
    Reply,
    error_reply,
    parse_request,
)
from emailrelay.logs import shorten
from emailrelay.store.keys import is_valid_key
from emailrelay.store.kv import StoreError

log = logging.getLogger(__name__)


class TrackingReader(Protocol):
    """The reading side of :class:`emailrelay.store.tracking.TrackingStore`."""

    async def get_record(self, email_id: str) -> api.TrackingRecord | None: ...
    async def group_ids(self, group_id: str) -> list[str] | None: ...
    async def group_ids_slice(self, group_id: str, offset: int, limit: int) -> list[str] | None: ...
    async def get_records(
        self, email_ids: Sequence[str], *, skip_unreadable: bool = False
    ) -> list[api.TrackingRecord]: ...


READ_CHUNK = 1000
"""Ids whose records are read (concurrently, by the store) before the reply
size is checked again."""


class ReplyTooLarge(Exception):
    pass


class GetEmailStatusHandler:
    def __init__(self, tracking: TrackingReader, max_reply_bytes: Callable[[], int]) -> None:
        """``max_reply_bytes`` is the NATS server's max payload (asked per
        request: a reconnect may land on a server with another limit)."""
        self._tracking = tracking
        self._max_reply_bytes = max_reply_bytes

    async def __call__(self, data: bytes) -> Reply:
        request = parse_request(data, api.GetEmailStatusRequest)
        if request is None:
            return error_reply(api.ERR_INVALID_PAYLOAD)
        if not request.email_id and not request.group_id:
            return error_reply(api.ERR_STATUS_ID_REQUIRED)
        if request.email_id and request.group_id:
            return error_reply(api.ERR_STATUS_ONE_ID_ONLY)
        if not (0 <= request.limit <= api.MAX_STATUS_PAGE) or request.offset < 0:
            return error_reply(api.ERR_INVALID_PAYLOAD)
        if request.email_id and not is_valid_key(request.email_id):
            # It cannot be a key, so no record has it; and an over-long id
            # must never reach a subject (nats-server drops the connection).
            return error_reply(api.ERR_NOT_FOUND, NO_RECORD)
        try:
            if request.email_id:
                record = await self._tracking.get_record(request.email_id)
                return error_reply(api.ERR_NOT_FOUND, NO_RECORD) if record is None else record
            return await self._group_reply(request)
        except ReplyTooLarge:
            return error_reply(api.ERR_GROUP_TOO_LARGE)
        except StoreError as exc:
            log.warning(
                "status query failed: store error",
                extra={
                    "email_id": shorten(request.email_id),
                    "group_id": shorten(request.group_id),
                    "error": repr(exc),
                },
            )
            return error_reply(api.ERR_INTERNAL)

    async def _group_reply(self, request: api.GetEmailStatusRequest) -> Reply:
        if request.limit or request.offset:
            limit = request.limit or api.MAX_STATUS_PAGE
            ids = await self._tracking.group_ids_slice(request.group_id, request.offset, limit)
        else:
            ids = await self._tracking.group_ids(request.group_id)
        if ids is None:
            return error_reply(api.ERR_NOT_FOUND, NO_GROUP)
        budget = self._max_reply_bytes()
        parts: list[bytes] = []
        size = 2  # the brackets
        for start in range(0, len(ids), READ_CHUNK):
            for record in await self._tracking.get_records(ids[start : start + READ_CHUNK]):
                encoded = record.to_json()
                size += len(encoded) + (1 if parts else 0)
                if size > budget:
                    raise ReplyTooLarge
                parts.append(encoded)
        return EncodedRecords(parts)
