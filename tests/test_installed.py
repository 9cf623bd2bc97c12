"""``emailrelay.installed``: which of an extra's distributions are missing,
read from requirement lines as the installed metadata holds them. The real
metadata is proven in ``nox -s packaging`` (a lean virtualenv); these pin
the parsing on lines written the way other build backends write them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError

import pytest

from emailrelay import installed

REQUIRES = [
    "nats-py>=2.9",
    'emailrelay[trio]; extra == "server"',
    'aiosmtplib>=3.0; extra == "server"',
    'Trio_Asyncio>=0.15; extra == "trio"',
    'moto[server]>=5.0; extra == "test"',
    'nats-py>=2.9; extra == "nats"',
]


@pytest.fixture
def only_nats_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def distribution(name: str) -> object:
        if name != "nats-py":
            raise PackageNotFoundError(name)
        return object()

    monkeypatch.setattr(installed, "requires", lambda _: REQUIRES)
    monkeypatch.setattr(installed, "distribution", distribution)


@pytest.mark.usefixtures("only_nats_installed")
def test_missing_follows_an_extra_that_names_another_extra_of_the_project() -> None:
    assert installed.missing_for("server") == ["aiosmtplib", "trio-asyncio"]


@pytest.mark.usefixtures("only_nats_installed")
def test_install_hint_is_none_for_an_extra_whose_distributions_are_all_installed() -> None:
    assert installed.install_hint("serve", "nats") is None
