"""The one valid send request every test starts from, the rules it is valid
under, and request bodies as large as NATS lets a caller send.

A test that needs a particular field says so at the call
(``send_request(subject="Hello")``); everything it does not name is a value
the relay accepts under the default rules.
"""

from __future__ import annotations

import json
from typing import Any

from emailrelay.addresses import parse_mailbox
from emailrelay.handlers.send_decision import SendRules

DEFAULT_FROM = parse_mailbox("noreply@lfx.linuxfoundation.org")
assert DEFAULT_FROM is not None

RULES = SendRules(
    email_enabled=True,
    default_from=DEFAULT_FROM,
    default_from_display_name="LFX Self Serve",
    allowed_from_domains=("lfx.linuxfoundation.org",),
    allowed_reply_to_domains=("linuxfoundation.org",),
    allowed_recipient_domains=(),
)
"""The relay's rules as the handler tests configure them; ``send_request()``
passes them."""

NATS_MAX_PAYLOAD = 1024 * 1024
"""nats-server's default max_payload: the largest request any caller can send."""


def send_request(**changes: Any) -> dict[str, Any]:
    """A valid ``emailrelay.send_email`` request with ``changes`` applied.

    ``from_`` names the ``from`` field (a Python keyword); a None value
    removes the field.
    """
    body: dict[str, Any] = {
        "to": "jane@example.com",
        "subject": "Hi",
        "html": "<p>hi</p>",
        "text": "hi",
    }
    for name, value in changes.items():
        key = "from" if name == "from_" else name
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def padded_to_max_payload(request: dict[str, str], field_name: str, unit: str = "x ") -> bytes:
    """``request`` as JSON with ``field_name`` filled with ``unit`` so that the
    whole body is as large as NATS accepts (``NATS_MAX_PAYLOAD`` bytes)."""
    empty = len(json.dumps({**request, field_name: ""}).encode())
    room = NATS_MAX_PAYLOAD - empty
    per_unit = len(json.dumps(unit).encode()) - 2
    value = unit * (room // per_unit)
    body = json.dumps({**request, field_name: value}).encode()
    assert len(body) <= NATS_MAX_PAYLOAD
    return body
