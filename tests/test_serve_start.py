"""``emailrelay serve`` at start: a taken HTTP port is one line, before NATS."""

from __future__ import annotations

import socket
import subprocess

from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RELAY_COMMAND, REPO_ROOT, relay_env
from tests.support.waiting import LOOPBACK


def test_taken_port_is_one_line_naming_port_before_joining_nats(nats_server: NatsServer) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            RELAY_COMMAND,
            env=relay_env({"NATS_URL": nats_server.url}, port=port),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    # LOG_LEVEL=debug: connecting to NATS or subscribing would have logged more lines.
    [line] = done.stderr.strip().splitlines()
    assert f"port {port} is already in use on {LOOPBACK}: set PORT to a free port" in line
    assert "Traceback" not in done.stderr
