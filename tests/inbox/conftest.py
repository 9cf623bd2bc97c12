"""One dev stack per test module, and a NATS client on it (the relay's side)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.inbox.helpers import dev_stack
from tests.support.nats_client import SyncNats
from tests.support.servers.dev import DevStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """``emailrelay dev`` for the module: its tests share it, each with emails of its own."""
    with dev_stack(tmp_path_factory.mktemp("inbox-dev")) as stack:
        yield stack


@pytest.fixture(scope="module")
def relay(stack: DevStack) -> Iterator[SyncNats]:
    """A NATS client on the stack, for send requests."""
    with SyncNats(stack.nats_url) as client:
        yield client
