"""The ``emailrelay`` command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.servers.relay import REPO_ROOT


def cli_env(nats_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    if nats_url is not None:
        env["NATS_URL"] = nats_url
    return env


def emailrelay(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emailrelay", *args],
        env=cli_env() if env is None else env,
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
