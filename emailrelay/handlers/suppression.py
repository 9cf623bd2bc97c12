"""``lfx.email-service.suppression.get`` / ``.list`` / ``.add`` / ``.remove``:
inspecting and managing the suppression list (served where
``SUPPRESSION_ENABLED=true``).

Plain async functions of the request body over
:class:`~emailrelay.store.suppressions.SuppressionStore`; the request loop
bounds them by the request's deadline (``internal error`` when it passes).
Errors: ``invalid request payload`` (not a JSON object, wrong types, a
``limit`` or ``offset`` out of range), ``address is required``, ``invalid
address`` (``add`` takes only one mailbox: a typo must not suppress a
string no send would ever match), ``not found`` (``get`` of an address not
suppressed) and ``internal error`` (the store failed). An address longer
than any entry can hold (:func:`could_be_listed`) is answered without the
store: ``get`` ``not found``, ``remove`` ``changed: false``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from emailrelay import api
from emailrelay.addresses import parse_mailbox, redact, strip_line_breaks
from emailrelay.handlers.replies import NOT_SUPPRESSED, Reply, error_reply, parse_request
from emailrelay.metrics import SUPPRESSIONS_ADDED
from emailrelay.store.kv import StoreError
from emailrelay.store.suppressions import (
    MAX_ADDRESS_CHARS,
    Suppression,
    SuppressionReason,
    SuppressionStore,
    normalize_address,
)

log = logging.getLogger(__name__)


def entry_of(suppression: Suppression) -> api.SuppressionEntry:
    return api.SuppressionEntry(
        address=suppression.address,
        reason=suppression.reason.value,
        suppressed_at=suppression.suppressed_at,
        event=dict(suppression.event),
    )


def _address(data: bytes) -> str | api.ErrorReply:
    parsed = parse_request(data, api.SuppressionAddressRequest)
    if parsed is None:
        return error_reply(api.ERR_INVALID_PAYLOAD)
    address = strip_line_breaks(parsed.address).strip()
    if not address:
        return error_reply(api.ERR_ADDRESS_REQUIRED)
    return address


def could_be_listed(address: str) -> bool:
    """Whether the list can hold ``address``: its compared form (the bare
    address of a mailbox, else the text) is at most ``MAX_ADDRESS_CHARS``.
    ``add`` refuses anything longer and a send's recipient is at most 254
    characters, so a longer one is not listed, whatever it is."""
    return len(normalize_address(address)) <= MAX_ADDRESS_CHARS


class GetSuppressionHandler:
    def __init__(self, store: SuppressionStore) -> None:
        self._store = store

    async def __call__(self, data: bytes) -> Reply:
        address = _address(data)
        if isinstance(address, api.ErrorReply):
            return address
        if not could_be_listed(address):
            return error_reply(api.ERR_NOT_FOUND)
        try:
            found = await self._store.get(address)
        except StoreError as exc:
            log.warning("suppression get failed", extra={"error": str(exc)})
            return error_reply(api.ERR_INTERNAL)
        return error_reply(api.ERR_NOT_FOUND, NOT_SUPPRESSED) if found is None else entry_of(found)


class ListSuppressionsHandler:
    def __init__(self, store: SuppressionStore) -> None:
        self._store = store

    async def __call__(self, data: bytes) -> Reply:
        parsed = parse_request(data, api.SuppressionListRequest)
        if parsed is None or not 0 <= parsed.limit <= api.MAX_SUPPRESSION_PAGE or parsed.offset < 0:
            return error_reply(api.ERR_INVALID_PAYLOAD)
        limit = parsed.limit or api.DEFAULT_SUPPRESSION_PAGE
        try:
            page, more = await self._store.page(limit, parsed.offset)
        except StoreError as exc:
            log.warning("suppression list failed", extra={"error": str(exc)})
            return error_reply(api.ERR_INTERNAL)
        return api.SuppressionListReply(
            suppressions=[entry_of(s) for s in page[:limit]],
            offset=parsed.offset,
            limit=limit,
            next_offset=parsed.offset + limit if more else None,
        )


class AddSuppressionHandler:
    def __init__(
        self, store: SuppressionStore, now: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._store = store
        self._now = now

    async def __call__(self, data: bytes) -> Reply:
        address = _address(data)
        if isinstance(address, api.ErrorReply):
            return address
        if len(address) > MAX_ADDRESS_CHARS:
            return error_reply(api.ERR_INVALID_ADDRESS)
        mailbox = parse_mailbox(address)
        if mailbox is None:
            return error_reply(api.ERR_INVALID_ADDRESS)
        try:
            added = await self._store.add(
                Suppression(mailbox.address, SuppressionReason.MANUAL, self._now())
            )
        except StoreError as exc:
            log.warning("suppression add failed", extra={"error": str(exc)})
            return error_reply(api.ERR_INTERNAL)
        if added:
            SUPPRESSIONS_ADDED.labels(SuppressionReason.MANUAL.value).inc()
            log.info("recipient suppressed by hand", extra={"to": redact(mailbox.address)})
        return api.SuppressionChangeReply(address=normalize_address(address), changed=added)


class RemoveSuppressionHandler:
    def __init__(self, store: SuppressionStore) -> None:
        self._store = store

    async def __call__(self, data: bytes) -> Reply:
        address = _address(data)
        if isinstance(address, api.ErrorReply):
            return address
        if not could_be_listed(address):
            return api.SuppressionChangeReply(address=normalize_address(address), changed=False)
        try:
            removed = await self._store.remove(address)
        except StoreError as exc:
            log.warning("suppression remove failed", extra={"error": str(exc)})
            return error_reply(api.ERR_INTERNAL)
        if removed:
            log.info("recipient removed from the suppression list", extra={"to": redact(address)})
        return api.SuppressionChangeReply(address=normalize_address(address), changed=removed)
