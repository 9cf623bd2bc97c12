"""``lfx.email-service.get_email_engagement_analytics``: counts over a group's
records, read in concurrent batches. Records that cannot be read or decoded
are skipped; only a failure reading the group index answers ``internal error``.
"""

from __future__ import annotations

import logging

from emailrelay import api
from emailrelay.handlers.replies import NO_GROUP, Reply, error_reply, parse_request
from emailrelay.handlers.status import TrackingReader
from emailrelay.logs import shorten
from emailrelay.store.kv import StoreError

log = logging.getLogger(__name__)

READ_CHUNK = 2000
"""Records counted per step, so a 50,000-email group is never held in memory at once."""


class GetEngagementAnalyticsHandler:
    def __init__(self, tracking: TrackingReader) -> None:
        self._tracking = tracking

    async def __call__(self, data: bytes) -> Reply:
        request = parse_request(data, api.GetEngagementAnalyticsRequest)
        if request is None:
            return error_reply(api.ERR_INVALID_PAYLOAD)
        if not request.group_id:
            return error_reply(api.ERR_GROUP_ID_REQUIRED)
        try:
            ids = await self._tracking.group_ids(request.group_id)
        except StoreError as exc:
            log.warning(
                "analytics failed: group index unreadable",
                extra={"group_id": shorten(request.group_id), "error": repr(exc)},
            )
            return error_reply(api.ERR_INTERNAL)
        if ids is None:
            return error_reply(api.ERR_NOT_FOUND, NO_GROUP)
        delivered = opened = unique_opened = failed = clicked = unique_clicked = 0
        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start : start + READ_CHUNK]
            for record in await self._tracking.get_records(chunk, skip_unreadable=True):
                delivered += record.delivered
                opened += record.open_count
                unique_opened += record.opened or record.open_count > 0
                failed += record.failed
                clicked += record.click_count
                unique_clicked += record.clicked or record.click_count > 0
        return api.EngagementAnalyticsReply(
            group_id=request.group_id,
            total_sent=len(ids),
            delivered=delivered,
            opened=opened,
            unique_opened=unique_opened,
            failed=failed,
            clicked=clicked,
            unique_clicked=unique_clicked,
        )
