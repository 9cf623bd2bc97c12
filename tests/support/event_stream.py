"""Reading the ``EMAIL_EVENTS`` stream from tests, message by message, by sequence.

Nothing here goes through the relay or the client: what a test asserts about
the stream is what nats-server holds.
"""

from __future__ import annotations

import json
from typing import Any

import nats.js.errors

from emailrelay import api
from tests.support.nats_client import SyncNats
from tests.support.waiting import wait_until


def stream_messages(client: SyncNats) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """Every message the stream holds: (subject, headers, body as JSON), oldest first."""

    async def read() -> list[tuple[str, dict[str, str], dict[str, Any]]]:
        js = client.nc.jetstream()
        try:
            info = await js.stream_info(api.EVENTS_STREAM)
        except nats.js.errors.NotFoundError:
            return []
        found = []
        for sequence in range(info.state.first_seq, info.state.last_seq + 1):
            if not info.state.messages:
                break
            msg = await js.get_msg(api.EVENTS_STREAM, sequence)
            found.append((msg.subject, dict(msg.headers or {}), json.loads(msg.data or b"{}")))
        return found

    return client.run(read())


def events_of(client: SyncNats, email_id: str) -> list[dict[str, Any]]:
    """The bodies of the stream's events about ``email_id``."""
    return [body for _, _, body in stream_messages(client) if body.get("email_id") == email_id]


def wait_for_event(
    client: SyncNats, email_id: str, event_type: str, timeout: float = 20.0
) -> dict[str, Any]:
    """The first ``event_type`` event about ``email_id``, once the stream holds one."""
    found: list[dict[str, Any]] = []

    def there() -> bool:
        found[:] = [e for e in events_of(client, email_id) if e["type"] == event_type]
        return bool(found)

    wait_until(there, timeout=timeout, message=f"no {event_type} event for {email_id}")
    return found[0]
