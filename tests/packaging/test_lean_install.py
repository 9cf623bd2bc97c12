"""``pip install emailrelay`` with no extras (``nox -s packaging``): the client
alone, built from this repository into a fresh virtualenv, used against a real
relay; and the relay's own commands refusing to start there with one line.

The virtualenv is made the way a caller makes theirs (``python -m venv``, then
its own pip); pip's cache makes that take seconds, not minutes. The relay
under test runs from the suite's own (full) install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import RelayFactory
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess
from tests.support.servers.smtp import SmtpServer

pytestmark = pytest.mark.packaging

REPOSITORY = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("aiosmtplib", "hypercorn", "botocore")
INSTALL_TIMEOUT = 300.0

CLIENT_SCRIPT = """
import asyncio
import json
import sys

from emailrelay.client import EmailRelayClient


async def main() -> None:
    async with EmailRelayClient.connect(servers=sys.argv[1]) as relay:
        sent = await relay.send(
            to="someone@example.com",
            subject="Sent from a lean install",
            html="<p>lean</p>",
            text="lean",
            group_id=sys.argv[2],
        )
        record = await relay.status(sent.email_id)
    print(json.dumps({"sent": sent.model_dump(), "record": record.model_dump(mode="json")}))


asyncio.run(main())
"""


class LeanVenv:
    """A virtualenv holding ``pip install <repository>`` and nothing else."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "bin" / "python"
        self.emailrelay = root / "bin" / "emailrelay"
        # Outside the repository, without PYTHONPATH: `python -c` puts the
        # working directory first on sys.path, and the source tree there
        # would stand in for the installed package.
        self.cwd = root.parent
        self.env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}

    def run(self, *args: str | Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(arg) for arg in args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def lean_venv(tmp_path_factory: pytest.TempPathFactory) -> LeanVenv:
    venv = LeanVenv(tmp_path_factory.mktemp("lean") / "venv")
    made = venv.run(sys.executable, "-m", "venv", venv.root)
    assert made.returncode == 0, made.stderr
    installed = venv.run(
        venv.root / "bin" / "pip", "install", "--quiet", REPOSITORY, timeout=INSTALL_TIMEOUT
    )
    assert installed.returncode == 0, installed.stderr
    return venv


def test_lean_install_imports_the_client_from_the_installed_package(lean_venv: LeanVenv) -> None:
    result = lean_venv.run(
        lean_venv.python, "-c", "import emailrelay.client; print(emailrelay.client.__file__)"
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(lean_venv.root)


@pytest.mark.parametrize("module", SERVER_ONLY)
def test_lean_install_leaves_out_the_servers_dependency(lean_venv: LeanVenv, module: str) -> None:
    result = lean_venv.run(lean_venv.python, "-c", f"import {module}")
    assert result.returncode == 1
    assert f"No module named '{module}'" in result.stderr


def test_lean_install_sends_and_reads_status_through_the_client(
    lean_venv: LeanVenv,
    relay_factory: RelayFactory,
    nats_server: NatsServer,
    smtp: SmtpServer,
) -> None:
    relay: RelayProcess = relay_factory()
    group = f"lean-{uuid.uuid4()}"
    script = lean_venv.root / "send_and_status.py"
    script.write_text(CLIENT_SCRIPT)
    result = lean_venv.run(lean_venv.python, script, nats_server.url, group)
    assert result.returncode == 0, result.stderr + relay.logs()
    reply = json.loads(result.stdout)
    assert reply["sent"]["group_id"] == group
    assert reply["record"]["email_id"] == reply["sent"]["email_id"]
    assert reply["record"]["subject"] == "Sent from a lean install"
    [message] = smtp.wait_for_messages(1)
    assert f"{group}/{reply['sent']['email_id']}".encode() in message.raw


@pytest.mark.parametrize(("command", "extra"), [("serve", "server"), ("dev", "dev")])
def test_lean_install_refuses_the_relays_commands_with_one_line(
    lean_venv: LeanVenv, command: str, extra: str
) -> None:
    result = lean_venv.run(lean_venv.emailrelay, command)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"pip install 'emailrelay[{extra}]'" in result.stderr


def test_installed_package_ships_the_dev_inbox_pages(lean_venv: LeanVenv) -> None:
    """The inbox's HTML, CSS and JavaScript are package data, in the wheel too."""
    listing = (
        "import emailrelay, pathlib; "
        "folder = pathlib.Path(emailrelay.__file__).parent / 'dev' / 'inbox' / 'static'; "
        "print(' '.join(sorted(p.name for p in folder.iterdir())))"
    )
    done = lean_venv.run(lean_venv.python, "-c", listing)
    assert done.returncode == 0, done.stderr
    shipped = set(done.stdout.split())
    assert {"index.html", "message.html", "group.html", "inbox.js", "inbox.css"} <= shipped
