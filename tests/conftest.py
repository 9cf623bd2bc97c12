"""Fixtures that start the real servers the suite runs against.

Expensive servers (nats-server, the SMTP servers) live for the whole session;
per-test fixtures hand them out in a clean state. Each fixture is named after
the real thing it starts. ``module_*`` fixtures give a module a nats-server
(and a client and relay on it) of its own, so a regression there cannot cut
other modules off their NATS; ``own_nats_server`` gives one test a server it
may stop and restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import EnvOverrides, RelayProcess, relay_defaults, running_relay
from tests.support.servers.smtp import SmtpServer
from tests.support.servers.sqs import SqsServer
from tests.support.transports import MotoSes, Outbox, outbox_for, transport_env

TLS_SMTP_USERNAME = "relay"
TLS_SMTP_PASSWORD = "s3cret"

RelayFactory = Callable[..., RelayProcess]


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A nats-server with JetStream, on a free loopback port, for the whole session."""
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_client(nats_server: NatsServer) -> Iterator[SyncNats]:
    """A synchronous nats-py client connected to ``nats_server``."""
    with SyncNats(nats_server.url) as client:
        yield client


@pytest.fixture
def own_nats_server() -> Iterator[NatsServer]:
    """A nats-server of this test's own, free to be stopped and restarted."""
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="module")
def module_nats_server() -> Iterator[NatsServer]:
    """A nats-server of this module's own: a regression here must not cut off other modules."""
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="module")
def module_nats_client(module_nats_server: NatsServer) -> Iterator[SyncNats]:
    """A synchronous nats-py client connected to ``module_nats_server``."""
    with SyncNats(module_nats_server.url) as client:
        yield client


@pytest.fixture(scope="module")
def module_relay(module_nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayProcess]:
    """One relay for the module, on ``module_nats_server``, sending to ``smtp_server``."""
    with running_relay(module_nats_server, smtp_server) as process:
        yield process


@pytest.fixture(scope="module")
def sqs_server() -> Iterator[SqsServer]:
    """moto's SQS server over HTTP on loopback (region us-east-1), one per module."""
    with SqsServer(region="us-east-1") as server:
        yield server


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    """A plain SMTP server (no TLS, no AUTH) for the whole session."""
    with SmtpServer() as server:
        yield server


@pytest.fixture
def smtp(smtp_server: SmtpServer) -> SmtpServer:
    """``smtp_server`` with nothing recorded and default behaviours."""
    smtp_server.reset()
    return smtp_server


@pytest.fixture(scope="session")
def tls_smtp_server() -> Iterator[SmtpServer]:
    """An SMTP server offering STARTTLS (trustme CA) and requiring AUTH relay/s3cret."""
    with SmtpServer(
        tls=True,
        auth_username=TLS_SMTP_USERNAME,
        auth_password=TLS_SMTP_PASSWORD,
        auth_required=True,
    ) as server:
        yield server


@pytest.fixture
def tls_smtp(tls_smtp_server: SmtpServer) -> SmtpServer:
    """``tls_smtp_server`` with nothing recorded and its STARTTLS + AUTH behaviours."""
    tls_smtp_server.reset()
    return tls_smtp_server


@pytest.fixture(scope="session")
def clear_auth_smtp_server() -> Iterator[SmtpServer]:
    """AUTH offered without TLS (``auth_require_tls=False``): a trap for credentials."""
    with SmtpServer(
        auth_username=TLS_SMTP_USERNAME,
        auth_password=TLS_SMTP_PASSWORD,
        auth_require_tls=False,
    ) as server:
        yield server


@pytest.fixture
def clear_auth_smtp(clear_auth_smtp_server: SmtpServer) -> SmtpServer:
    """``clear_auth_smtp_server`` with nothing recorded."""
    clear_auth_smtp_server.reset()
    return clear_auth_smtp_server


@pytest.fixture(scope="session")
def ca_pem_file(tls_smtp_server: SmtpServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEM of the CA that signed ``tls_smtp_server``'s certificate (for ``SSL_CERT_FILE``)."""
    return tls_smtp_server.write_ca_pem(tmp_path_factory.mktemp("smtp-ca") / "ca.pem")


@pytest.fixture
def relay_factory(nats_server: NatsServer, smtp_server: SmtpServer) -> Iterator[RelayFactory]:
    """Start relay subprocesses; all are stopped at teardown.

    ``relay_factory(env=None, *, wait_ready=True) -> RelayProcess``. The default
    environment points at ``nats_server`` and ``smtp_server`` with sending on
    and no TLS; ``env`` overrides it (a None value removes a variable).
    """
    started: list[RelayProcess] = []

    def start(env: EnvOverrides | None = None, *, wait_ready: bool = True) -> RelayProcess:
        relay = RelayProcess({**relay_defaults(nats_server, smtp_server), **(env or {})})
        started.append(relay)
        relay.start()
        if wait_ready:
            relay.wait_ready()
        return relay

    yield start
    for relay in started:
        relay.close()


@pytest.fixture(scope="session")
def moto_ses() -> Iterator[MotoSes]:
    """moto's SES v2 API over HTTP on loopback, the relay's sender domains verified."""
    with SqsServer(region="us-east-1") as server:
        yield MotoSes(server)


@pytest.fixture(scope="module")
def transport(request: pytest.FixtureRequest) -> str:
    """The module relay's EMAIL_TRANSPORT: smtp, unless a test is marked
    ``on_both_transports`` (tests/support/transports.py)."""
    return str(getattr(request, "param", "smtp"))


@pytest.fixture(scope="module")
def transport_relay_env(request: pytest.FixtureRequest, transport: str) -> EnvOverrides:
    """What the module relay's environment adds for ``transport`` (moto only when ses)."""
    if transport == "ses":
        return transport_env(transport, request.getfixturevalue("moto_ses"))
    return {}


@pytest.fixture
def outbox(request: pytest.FixtureRequest, transport: str, smtp_server: SmtpServer) -> Outbox:
    """What ``transport``'s server received in this test: aiosmtpd's or moto's messages."""
    if transport == "ses":
        return outbox_for(transport, smtp_server, request.getfixturevalue("moto_ses"))
    return outbox_for(transport, smtp_server, None)
