"""``lfx.email-service.erase_recipient_data``: one person's tracking data
removed on request (docs/contract.md, "Erasure by recipient").

Every record addressed to the recipient (bare address, case-insensitive) is
purged, and its id removed from its group's index; the records are found
through the recipient index (``email-recipient-index``), never by scanning.
The suppression-list entry is kept unless the request says
``"suppression": true``: it is the do-not-contact record.

Errors: ``invalid request payload`` (not a JSON object, wrong types),
``recipient is required``, ``invalid address`` (not one mailbox), and
``erasure incomplete, safe to repeat`` when the store fails midway (what is
left is found again by the next request). One audit line per erasure names
the address only by its hash.
"""

from __future__ import annotations

import logging
from typing import Protocol

from emailrelay import api
from emailrelay.addresses import parse_mailbox, strip_line_breaks
from emailrelay.handlers.replies import Reply, error_reply, parse_request
from emailrelay.store.kv import StoreError
from emailrelay.store.suppressions import MAX_ADDRESS_CHARS, SuppressionStore
from emailrelay.store.tracking import Erasure, recipient_key

log = logging.getLogger(__name__)


class RecipientEraser(Protocol):
    """The erasing side of :class:`emailrelay.store.tracking.TrackingStore`."""

    async def erase_recipient(self, address: str) -> Erasure: ...


def recipient_of(data: bytes) -> tuple[str, bool] | api.ErrorReply:
    """The request's bare address and whether to erase its suppression too,
    or the error reply."""
    request = parse_request(data, api.EraseRecipientDataRequest)
    if request is None:
        return error_reply(api.ERR_INVALID_PAYLOAD)
    recipient = strip_line_breaks(request.recipient).strip()
    if not recipient:
        return error_reply(api.ERR_RECIPIENT_REQUIRED)
    mailbox = None if len(recipient) > MAX_ADDRESS_CHARS else parse_mailbox(recipient)
    if mailbox is None:
        return error_reply(api.ERR_INVALID_ADDRESS)
    return mailbox.address, request.suppression


def audit(address: str, erasure: Erasure, suppression_erased: bool, how: str) -> None:
    """The one audit line of an erasure: counts and the address's hash."""
    log.info(
        "recipient data erased",
        extra={
            "recipient_hash": recipient_key(address),
            "erased_records": erasure.records,
            "erased_index_entries": erasure.index_entries,
            "suppression_erased": suppression_erased,
            "how": how,
        },
    )


class EraseRecipientDataHandler:
    def __init__(
        self, tracking: RecipientEraser, suppressions: SuppressionStore | None = None
    ) -> None:
        self._tracking = tracking
        self._suppressions = suppressions

    async def __call__(self, data: bytes) -> Reply:
        parsed = recipient_of(data)
        if isinstance(parsed, api.ErrorReply):
            return parsed
        address, erase_suppression = parsed
        try:
            erasure = await self._tracking.erase_recipient(address)
            suppression_erased = False
            if erase_suppression and self._suppressions is not None:
                suppression_erased = await self._suppressions.erase(address)
        except StoreError as exc:
            log.warning(
                "recipient erasure incomplete",
                extra={"recipient_hash": recipient_key(address), "error": repr(exc)},
            )
            return error_reply(api.ERR_ERASURE_INCOMPLETE)
        audit(address, erasure, suppression_erased, "request")
        return api.EraseRecipientDataReply(
            erased_records=erasure.records, erased_index_entries=erasure.index_entries
        )
