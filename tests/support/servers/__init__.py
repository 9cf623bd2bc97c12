"""Real servers the tests start themselves: nats-server, an aiosmtpd SMTP server, the relay.

Modules: ``tests.support.servers.nats`` (NatsServer), ``tests.support.servers.smtp`` (SmtpServer),
``tests.support.servers.relay`` (RelayProcess). This package module holds what they share.
"""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """Terminate ``proc`` (SIGTERM), kill it if it is still running after ``timeout``.

    Returns the exit code. Safe to call on a process that has already exited.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=timeout)
