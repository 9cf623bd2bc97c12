"""The dev inbox: every email the dev stack captured, in a browser.

``emailrelay dev`` serves it on http://127.0.0.1:8025/ (``--inbox-port``);
``emailrelay serve`` never does. It reads the capture directory's ``.eml``
files (:mod:`.mailbox`) and the tracking records, fires engagement events into
the dev event queue, and tells open pages when to read again (:mod:`.changes`).
The pages, the JSON API and the rules for showing untrusted HTML are in
:mod:`.app`; the HTML, CSS and JavaScript are package data in ``static/``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import anyio.abc

from emailrelay.dev.eventqueue import DevEventQueue
from emailrelay.dev.inbox.app import InboxApp
from emailrelay.dev.inbox.changes import Changes
from emailrelay.dev.inbox.mailbox import Mailbox
from emailrelay.engagement.handler import RecordUpdater
from emailrelay.handlers.status import TrackingReader
from emailrelay.health import serve_asgi

__all__ = ["DevInbox", "InboxApp"]


class DevInbox:
    """The inbox of one capture directory, fed by one dev event queue."""

    def __init__(self, capture_dir: Path, events: DevEventQueue) -> None:
        self.capture_dir = capture_dir
        self.changes = Changes()
        self._events = events

    def watching(self, store: RecordUpdater) -> RecordUpdater:
        """The store the dev poller should write through, so pages see each update."""
        return self.changes.watching(store)

    def app(self, tracking: TrackingReader) -> InboxApp:
        return InboxApp(Mailbox(self.capture_dir), tracking, self._events, self.changes)

    async def serve(
        self,
        tracking: TrackingReader,
        sock: socket.socket,
        *,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on ``sock`` (bound, from :func:`emailrelay.health.bind_http_socket`;
        closed when serving ends) until cancelled; started with the page's URL."""
        host, port = sock.getsockname()[:2]
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.changes.watch_directory, self.capture_dir)
            # hypercorn wraps the descriptor and closes it itself: detach ours.
            await tg.start(serve_asgi, self.app(tracking), f"fd://{sock.detach()}")
            task_status.started(f"http://{host}:{port}/")
