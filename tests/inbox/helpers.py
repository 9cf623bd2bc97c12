"""A dev stack to test the inbox on, and emails sent through its relay."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emailrelay import api
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.test_dev import DevStack


@contextlib.contextmanager
def dev_stack(directory: Path) -> Iterator[DevStack]:
    """``emailrelay dev`` on free ports (the inbox too), state in ``directory``."""
    stack = DevStack(directory / "state", directory)
    try:
        yield stack
    finally:
        stack.kill()


def send(relay: SyncNats, **fields: Any) -> api.SendEmailReply:
    """A send request through the relay (``send_request()`` with ``fields``)."""
    reply = json.loads(relay.request(api.SEND_EMAIL_SUBJECT, send_request(**fields)))
    return api.SendEmailReply.model_validate(reply)
