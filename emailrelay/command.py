"""What the ``emailrelay`` command tells whoever ran it: its exit codes and
how to run it again. Shared by :mod:`emailrelay.cli`, :mod:`emailrelay.app`
(``serve``) and :mod:`emailrelay.dev.stack` (``dev``), so none of them
imports another for it. Standard library only: it runs in the lean install.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
"""``serve`` and ``dev``: could not start, or a part failed for good."""
EXIT_ERROR_REPLY = 1
"""Client commands: the relay answered with a contract error."""
EXIT_USAGE = 2
"""A flag or variable that cannot be used (also a lean install lacking an extra)."""
EXIT_STATE_DIR_IN_USE = 2
"""``dev``: another ``emailrelay dev`` holds the state directory."""
EXIT_NO_RELAY = 3
"""Client commands: NATS unreachable, nobody serving, or no reply in time."""


def command_name() -> str:
    """How to run this command again, for hints a user can paste: ``emailrelay``
    when that is what is on PATH, else the path that was used (an unactivated
    virtualenv's ``.venv/bin/emailrelay``) or ``python -m emailrelay``."""
    invoked = Path(sys.argv[0])
    if invoked.name != "emailrelay":
        return f"{shlex.quote(sys.executable)} -m emailrelay"
    on_path = shutil.which("emailrelay")
    if on_path is not None and Path(on_path).resolve() == invoked.resolve():
        return "emailrelay"
    return shlex.quote(str(invoked))
