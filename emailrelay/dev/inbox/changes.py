"""A version number that goes up whenever something the inbox shows may have
moved, and a way to wait for it: what the event stream tells the pages.

Two sources bump it: the capture directory (a file arrived or went, seen by
polling its modification time every :data:`POLL_INTERVAL`) and every record
update the dev poller makes (:meth:`Changes.watching` wraps the store it writes
through). The pages then read the API again; they never trust the stream for data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio

from emailrelay.api import TrackingRecord
from emailrelay.engagement.handler import RecordUpdater

POLL_INTERVAL = 0.2


class Changes:
    def __init__(self) -> None:
        self.version = 0
        self._moved = anyio.Event()

    def bump(self) -> None:
        self.version += 1
        self._moved.set()
        self._moved = anyio.Event()

    async def wait_past(self, version: int) -> int:
        """Until the version is above ``version``; the new version."""
        while self.version <= version:
            await self._moved.wait()
        return self.version

    def watching(self, store: RecordUpdater) -> RecordUpdater:
        """``store``, bumping the version after each update through it."""
        return _Watched(store, self)

    async def watch_directory(self, directory: Path) -> None:
        """Bump whenever ``directory``'s modification time changes; until cancelled."""
        seen = _mtime(directory)
        while True:
            await anyio.sleep(POLL_INTERVAL)
            now = _mtime(directory)
            if now != seen:
                seen = now
                self.bump()


class _Watched:
    def __init__(self, store: RecordUpdater, changes: Changes) -> None:
        self._store = store
        self._changes = changes

    async def update_record(
        self, email_id: str, change: Callable[[TrackingRecord], bool]
    ) -> TrackingRecord | None:
        try:
            return await self._store.update_record(email_id, change)
        finally:
            self._changes.bump()


def _mtime(directory: Path) -> int | None:
    try:
        return directory.stat().st_mtime_ns
    except OSError:
        return None
