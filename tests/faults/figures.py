"""Figures the fault tests measure (recovery times, requests lost, loop lag).

Speed is measured, not asserted: each test records what it saw with
:func:`record`; the line is printed at once (visible with ``-s``) and again
in a table at the end of the session (``pytest_terminal_summary`` in this
package's conftest), and written to the file named by ``$FAULTS_FIGURES``
when that is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Figure:
    test: str
    name: str
    value: float | int | str
    unit: str = ""

    def line(self) -> str:
        value = f"{self.value:.3f}" if isinstance(self.value, float) else str(self.value)
        return f"{self.test}: {self.name} = {value}{' ' + self.unit if self.unit else ''}"


FIGURES: list[Figure] = []


def current_test() -> str:
    """The running test's name, from pytest's environment variable."""
    name = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    return name.rsplit("::", 1)[-1]


def record(name: str, value: float | int | str, unit: str = "") -> None:
    figure = Figure(current_test(), name, value, unit)
    FIGURES.append(figure)
    print(f"[faults] {figure.line()}", flush=True)


def write_report(path: Path) -> None:
    path.write_text("".join(figure.line() + "\n" for figure in FIGURES))
