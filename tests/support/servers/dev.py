"""``python -m emailrelay dev`` as a subprocess of its own (process group), on
free ports, for the dev stack's and the dev inbox's tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.servers.relay import REPO_ROOT
from tests.support.waiting import LOOPBACK, free_port, wait_until


def children_of(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (zombies included until reaped)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the ppid follows it.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class DevStack:
    """``python -m emailrelay dev`` on free ports, in its own session (process group).

    ``nats_port=0`` lets the stack pick; its URL is then read from its state dir."""

    def __init__(
        self,
        state_dir: Path,
        log_dir: Path,
        nats_port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.state_dir = state_dir
        self.stdout_path = log_dir / "dev.stdout"
        self.stderr_path = log_dir / "dev.stderr"
        self.nats_port = free_port() if nats_port is None else nats_port
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "emailrelay",
                    "dev",
                    "--nats-port",
                    str(self.nats_port),
                    "--smtp-port",
                    "0",
                    "--port",
                    "0",
                    "--nats-monitoring-port",
                    "0",
                    "--inbox-port",
                    "0",
                    "--state-dir",
                    str(state_dir),
                    *extra_args,
                ],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        wait_until(self._ready, timeout=30, message=f"emailrelay dev not ready\n{self.logs()}")

    @property
    def nats_url(self) -> str:
        if self.nats_port == 0:
            url: str = json.loads((self.state_dir / "stack.json").read_text())["nats_url"]
            return url
        return f"nats://{LOOPBACK}:{self.nats_port}"

    @property
    def inbox_url(self) -> str:
        """The dev inbox (``--inbox-port 0``: any free port), from ``stack.json``."""
        url: str = json.loads((self.state_dir / "stack.json").read_text())["inbox_url"]
        return url

    def nats_server_pids(self) -> list[int]:
        return [
            pid
            for pid in children_of(self.process.pid)
            if "nats-server" in Path(f"/proc/{pid}/cmdline").read_text()
        ]

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def logs(self) -> str:
        stderr = self.stderr_path.read_text(errors="replace")
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{stderr}"

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"emailrelay dev exited early\n{self.logs()}")
        return "Ready. Send a first email:" in self.stdout()

    def interrupt(self, timeout: float = 30.0) -> int:
        """Ctrl-C as a terminal sends it: SIGINT to the whole process group."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
