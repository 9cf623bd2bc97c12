"""``emailrelay erase --recipient ADDRESS --scan``: erasure that also finds
records written before the recipient index existed.

The scan streams the whole ``email-recipients`` bucket once (an ordered
consumer: memory stays bounded by the matches, not the bucket), keeps the
ids of the records addressed to the recipient, then erases them together
with everything the recipient index names, exactly as the relay's
``erase_recipient_data`` does. Progress goes to stderr. Every
:data:`SAVE_EVERY` records the scan's position and its matches go to a state
file, so an interrupted scan resumes where it stopped instead of starting
over; the file holds ids and the address's hash, never the address, and is
removed when the erasure is done.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import trio
import trio_asyncio

from emailrelay import api
from emailrelay.api import TrackingRecord
from emailrelay.bridge.nats import JetStreamKeyValue, NatsConnection
from emailrelay.handlers.erasure import audit
from emailrelay.store.buckets import tracking_buckets
from emailrelay.store.suppressions import normalize_address
from emailrelay.store.tracking import Erasure, TrackingStore, recipient_key

SAVE_EVERY = 10_000


def default_state_file(address: str) -> Path:
    return Path(f".emailrelay-erase-{recipient_key(address)[:16]}.json")


def run_scan(
    servers: tuple[str, ...], address: str, state_file: Path, timeout: float
) -> api.EraseRecipientDataReply:
    erasure = trio.run(_scan_and_erase, servers, address, state_file, timeout)
    audit(address, erasure, False, "scan")
    state_file.unlink(missing_ok=True)
    return api.EraseRecipientDataReply(
        erased_records=erasure.records, erased_index_entries=erasure.index_entries
    )


async def _scan_and_erase(
    servers: tuple[str, ...], address: str, state_file: Path, connect_within: float
) -> Erasure:
    async with trio_asyncio.open_loop():
        nats = await NatsConnection.connect(servers, None, give_up_after=connect_within)
        try:
            records_spec, groups_spec, recipients_spec = tracking_buckets()
            records = await nats.key_value(records_spec.name)
            groups = await nats.key_value(groups_spec.name)
            recipients = await nats.key_value(recipients_spec.name)
            if records is None or groups is None or recipients is None:
                raise SystemExit("emailrelay: the tracking buckets do not exist")
            matches = await _scan(records, address, state_file, sys.stderr)
            expiring = await groups.max_age() > 0  # keep range keys alive, as the relay does
            store = TrackingStore(records, groups, recipients=recipients, expiring=expiring)
            erasure = await store.erase_recipient(address, also=matches)
        finally:
            await nats.drain()
    return erasure


async def _scan(
    records: JetStreamKeyValue, address: str, state_file: Path, progress: TextIO
) -> list[str]:
    """The ids of the records addressed to ``address``, resuming from ``state_file``."""
    wanted = normalize_address(address)
    hashed = recipient_key(address)
    state = _load(state_file, hashed)
    revision, found = state.get("revision", 0), state.get("matches", [])
    after = revision if isinstance(revision, int) else 0
    matches = [str(i) for i in found] if isinstance(found, list) else []
    total = await records.count()
    seen = 0
    async for key, entry in records.scan():
        seen += 1
        if entry.revision > after:
            try:
                record = TrackingRecord.model_validate_json(entry.value)
            except ValueError:
                record = None
            if record is not None and normalize_address(record.to) == wanted:
                matches.append(key)
            after = max(after, entry.revision)
        if seen % SAVE_EVERY == 0:
            _save(state_file, hashed, after, matches)
        if seen % 1000 == 0 or seen == total:
            _bar(progress, seen, total)
    _save(state_file, hashed, after, matches)
    _bar(progress, seen, max(total, seen))
    print(file=progress)
    return matches


def _bar(progress: TextIO, done: int, total: int) -> None:
    width = 30
    filled = width * done // total if total else width
    print(
        f"\rscanning [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=progress
    )


def _load(state_file: Path, hashed: str) -> dict[str, object]:
    try:
        state: object = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(state, dict) and state.get("recipient_hash") == hashed:
        return {str(k): v for k, v in state.items()}
    return {}


def _save(state_file: Path, hashed: str, revision: int, matches: list[str]) -> None:
    temporary = state_file.with_suffix(".tmp")
    temporary.write_text(
        json.dumps({"recipient_hash": hashed, "revision": revision, "matches": matches})
    )
    temporary.replace(state_file)
