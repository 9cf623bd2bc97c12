"""The relay under test, run as a real subprocess: ``python -m emailrelay serve``.

The environment is the test process's own, minus anything that configures
the relay or AWS (so a developer's shell cannot leak into a test), plus safe
defaults and the test's overrides. An override whose value is None removes
the variable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import stop_process
from tests.support.servers.nats import NatsServer
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import LOOPBACK, free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]

RELAY_COMMAND: tuple[str, ...] = (sys.executable, "-m", "emailrelay", "serve")

# Inherited variables that would configure the relay behind a test's back.
RELAY_VARIABLES = frozenset(
    {
        "NATS_URL",
        "PORT",
        "HTTP_HOST",
        "EMAIL_ENABLED",
        "SMTP_HOST",
        "SMTP_PORT",
        "SMTP_FROM",
        "SMTP_USERNAME",
        "SMTP_PASSWORD",
        "SMTP_TLS_MODE",
        "DEFAULT_SMTP_FROM",
        "DEFAULT_SMTP_FROM_DISPLAY_NAME",
        "SMTP_ALLOWED_FROM_DOMAINS",
        "SMTP_ALLOWED_REPLY_TO_DOMAINS",
        "SMTP_ALLOWED_RECIPIENT_DOMAINS",
        "SES_CONFIGURATION_SET",
        "SES_EVENTING_ENABLED",
        "SES_ENGAGEMENT_SQS_QUEUE_URL",
        "LOG_LEVEL",
        "LOG_ADD_SOURCE",
        # A CA bundle of the developer's would change which SMTP certificates
        # the relay trusts; a test that wants one passes it as an override.
        "SSL_CERT_FILE",
    }
)

EnvOverrides = Mapping[str, str | None]


def relay_env(overrides: EnvOverrides | None = None, *, port: int | None = None) -> dict[str, str]:
    """The environment a relay subprocess runs with.

    Always: ``HTTP_HOST=127.0.0.1``, ``LOG_LEVEL=debug``, ``AWS_EC2_METADATA_DISABLED=true``,
    ``NO_PROXY`` for loopback, the repository on ``PYTHONPATH``, and ``PORT`` (a free
    port unless given). ``overrides`` win; a None value removes the variable.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in RELAY_VARIABLES and not name.startswith("AWS_")
    }
    env.update(
        {
            "PORT": str(port if port is not None else free_port()),
            "HTTP_HOST": LOOPBACK,
            "LOG_LEVEL": "debug",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            "PYTHONUNBUFFERED": "1",
        }
    )
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class RelayProcess:
    """One relay subprocess with its output captured to files.

    ``command`` defaults to ``python -m emailrelay serve``; the infrastructure's
    own tests pass a stand-in.
    """

    def __init__(
        self,
        env: EnvOverrides | None = None,
        *,
        command: Sequence[str] = RELAY_COMMAND,
    ) -> None:
        self.env = relay_env(env)
        self.port = int(self.env["PORT"])
        self.command = list(command)
        self._tmp = tempfile.TemporaryDirectory(prefix="emailrelay-")
        self.stdout_path = Path(self._tmp.name) / "stdout.log"
        self.stderr_path = Path(self._tmp.name) / "stderr.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("relay not started")
        return self._proc

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("relay already started")
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        return self

    def stdout(self) -> str:
        return _read(self.stdout_path)

    def stderr(self) -> str:
        return _read(self.stderr_path)

    def logs(self) -> str:
        """stdout and stderr so far, labelled (for assertion messages)."""
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"

    def get(self, path: str, timeout: float = 2.0) -> httpx.Response:
        """GET ``path`` on the relay's HTTP port (loopback, no proxies)."""
        with httpx.Client(base_url=self.base_url, trust_env=False, timeout=timeout) as client:
            return client.get(path)

    def metric(self, name: str, **labels: str) -> float:
        """One sample from ``/metrics`` (0 when not written yet)."""
        text = self.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def metric_sum(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
        total = 0.0
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += float(sample.value)
        return total

    def readyz_status(self) -> int | None:
        """Status of ``GET /readyz``, or None when nothing answers."""
        try:
            return self.get("/readyz").status_code
        except httpx.TransportError:
            return None

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until ``/readyz`` answers 200; fail at once if the process exits."""
        self.wait_readyz(200, timeout=timeout)

    def wait_readyz(self, status: int | None, timeout: float = 20.0) -> None:
        """Wait until ``/readyz`` answers ``status`` (None: not answering)."""

        def answers() -> bool:
            code = self.readyz_status()
            if code != status and self.returncode is not None:
                raise AssertionError(
                    f"relay exited with {self.returncode} while waiting for /readyz {status}\n"
                    f"{self.logs()}"
                )
            return code == status

        wait_until(
            answers,
            timeout=timeout,
            message=f"relay /readyz did not answer {status}\n{self.logs()}",
        )

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` (SIGTERM by default) without waiting."""
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit; its exit code. AssertionError on timeout."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"relay still running after {timeout:.1f}s\n{self.logs()}"
            ) from None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if never started)."""
        if self._proc is None:
            return None
        return stop_process(self._proc, timeout=timeout)

    def close(self) -> None:
        """Stop the process and delete its log directory."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def run_relay_once(
    env: EnvOverrides | None = None,
    timeout: float = 20.0,
    *,
    command: Sequence[str] = RELAY_COMMAND,
) -> tuple[int, str, str]:
    """Run the relay until it exits by itself (config errors); (exit code, stdout, stderr).

    AssertionError, after killing it, if it is still running after ``timeout``.
    """
    try:
        done = subprocess.run(
            list(command),
            env=relay_env(env),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"relay did not exit within {timeout:.1f}s\n"
            f"--- stdout ---\n{_text(exc.stdout)}\n--- stderr ---\n{_text(exc.stderr)}"
        ) from None
    return done.returncode, _text(done.stdout), _text(done.stderr)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def relay_defaults(nats_server: NatsServer | str, smtp_server: SmtpServer) -> dict[str, str | None]:
    """A relay against these servers with sending on and no TLS (``nats_server``:
    a server, or the URL of one, such as a cluster node's)."""
    return {
        "NATS_URL": nats_server if isinstance(nats_server, str) else nats_server.url,
        "SMTP_HOST": smtp_server.host,
        "SMTP_PORT": str(smtp_server.port),
        "EMAIL_ENABLED": "true",
        "SMTP_TLS_MODE": "none",
    }


@contextlib.contextmanager
def running_relay(
    nats_server: NatsServer, smtp_server: SmtpServer, env: EnvOverrides | None = None
) -> Iterator[RelayProcess]:
    """One relay process against these servers, ready, stopped afterwards."""
    with RelayProcess({**relay_defaults(nats_server, smtp_server), **(env or {})}) as relay:
        relay.wait_ready()
        yield relay
