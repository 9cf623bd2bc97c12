"""Helpers shared by the status and analytics end-to-end tests."""

from __future__ import annotations

import json
import uuid
from typing import Any

from emailrelay import api
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request


def send(client: SyncNats, group_id: str = "", **fields: str) -> dict[str, str]:
    """Send one email through the relay; the success reply."""
    # The status tests read this recipient and subject back from the record.
    fields = {"to": "someone@example.org", "subject": "hello", **fields}
    payload = send_request(group_id=group_id, **fields)
    reply: dict[str, str] = client.request_json(api.SEND_EMAIL_SUBJECT, payload)
    assert reply.get("email_id"), reply
    return reply


def status(client: SyncNats, **request: Any) -> Any:
    return client.request_json(api.GET_EMAIL_STATUS_SUBJECT, request)


def analytics(client: SyncNats, **request: Any) -> Any:
    return client.request_json(api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT, request)


def unique_group(prefix: str = "group") -> str:
    return f"{prefix}-{uuid.uuid4()}"


def stored_record(client: SyncNats, email_id: str) -> dict[str, Any]:
    value = client.kv_get(api.RECIPIENTS_BUCKET, email_id)
    assert value is not None, email_id
    record: dict[str, Any] = json.loads(value)
    return record


def put_record(client: SyncNats, email_id: str, group_id: str, **fields: Any) -> None:
    record = {
        "group_id": group_id,
        "email_id": email_id,
        "to": "someone@example.org",
        "subject": "hello",
        "sent_at": "2024-05-01T10:00:00Z",
        "delivered": False,
        "opened": False,
        "open_count": 0,
        "failed": False,
        **fields,
    }
    client.kv_put(api.RECIPIENTS_BUCKET, email_id, record)
