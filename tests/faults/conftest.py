"""Fault-suite fixtures and the end-of-session table of measured figures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.figures import FIGURES, write_report
from tests.support.servers.smtp import SmtpServer


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault figures")
    for figure in FIGURES:
        terminalreporter.write_line(figure.line())
    target = os.environ.get("FAULTS_FIGURES")
    if target:
        write_report(Path(target))
        terminalreporter.write_line(f"(also written to {target})")


@pytest.fixture
def fault_smtp() -> Iterator[SmtpServer]:
    """An SMTP server of the test's own: outages stop and start it on its port."""
    with SmtpServer() as server:
        yield server
