"""A dev stack to test the inbox on, and emails sent through its relay."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emailrelay import api
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.dev import DevStack


@contextlib.contextmanager
def dev_stack(directory: Path) -> Iterator[DevStack]:
    """``emailrelay dev`` on free ports (the inbox too), state in ``directory``."""
    stack = DevStack(directory / "state", directory)
    try:
        yield stack
    finally:
        stack.kill()


def send(relay: SyncNats, **fields: Any) -> api.SendEmailReply:
    """A send request through the relay (``send_request()`` with ``fields``), to
    a recipient of its own unless ``fields`` names one: dev suppresses an address
    once a test bounces it, and a shared one would refuse the next test's send."""
    fields.setdefault("to", f"inbox-{uuid.uuid4().hex[:12]}@example.com")
    reply = json.loads(relay.request(api.SEND_EMAIL_SUBJECT, send_request(**fields)))
    return api.SendEmailReply.model_validate(reply)
