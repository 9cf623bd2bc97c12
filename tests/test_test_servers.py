"""Self-checks of the test infrastructure: the real servers start and behave as the suite expects.

Nothing here tests the relay; the relay subprocess helper is checked with a stand-in.
"""

from __future__ import annotations

import smtplib
import ssl
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nats_client import SyncNats
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, relay_env, run_relay_once
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

SENDER = "sender@lfx.linuxfoundation.org"
RECIPIENT = "someone@example.com"

# A header folded over two lines and a body line starting with a dot (dot-stuffed on the wire).
MESSAGE = (
    b"From: sender@lfx.linuxfoundation.org\r\n"
    b"To: someone@example.com\r\n"
    b"Subject: hello\r\n"
    b"X-Folded: first part\r\n"
    b" second part\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"body\r\n"
)


def send(server: SmtpServer, message: bytes = MESSAGE) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail(SENDER, [RECIPIENT], message)


@pytest.fixture
def bucket(nats_client: SyncNats) -> Iterator[str]:
    name = f"selfcheck-{uuid.uuid4().hex[:8]}"
    nats_client.create_bucket(name)
    yield name
    nats_client.delete_bucket(name)


# nats-server


def test_nats_server_answers_request_reply(nats_client: SyncNats) -> None:
    with nats_client.responder("selfcheck.echo", lambda body: {"echo": body.decode()}):
        assert nats_client.request_json("selfcheck.echo", "ping") == {"echo": "ping"}


def test_request_many_returns_replies_in_order(nats_client: SyncNats) -> None:
    with nats_client.responder("selfcheck.double", lambda body: {"n": 2 * int(body)}):
        replies = nats_client.request_many("selfcheck.double", [str(i) for i in range(100)])
    assert replies == [{"n": 2 * i} for i in range(100)]


def test_kv_put_then_get(nats_client: SyncNats, bucket: str) -> None:
    nats_client.kv_put(bucket, "key", {"a": 1})
    assert nats_client.kv_get(bucket, "key") == b'{"a": 1}'


def test_kv_get_of_missing_key_is_none(nats_client: SyncNats, bucket: str) -> None:
    assert nats_client.kv_get(bucket, "missing") is None


def test_restart_keeps_url_and_jetstream_data(own_nats_server: NatsServer) -> None:
    url = own_nats_server.url
    with SyncNats(url) as client:
        client.create_bucket("kept")
        client.kv_put("kept", "key", b"value")
    own_nats_server.restart()
    assert own_nats_server.url == url
    with SyncNats(url) as client:
        assert client.kv_get("kept", "key") == b"value"


def test_client_reconnects_after_restart(own_nats_server: NatsServer) -> None:
    with SyncNats(own_nats_server.url) as client:
        own_nats_server.stop()
        wait_until(lambda: not client.is_connected, message="client did not notice the stop")
        own_nats_server.start()
        wait_until(lambda: client.is_connected, message="client did not reconnect")
        with client.responder("selfcheck.back", lambda body: body):
            assert client.request("selfcheck.back", b"again") == b"again"


# SMTP server


def test_smtp_records_envelope_and_raw_bytes(smtp: SmtpServer) -> None:
    send(smtp)
    [message] = smtp.wait_for_messages(1)
    assert message.mail_from == SENDER
    assert message.rcpt_tos == [RECIPIENT]
    assert message.raw == MESSAGE


def test_smtp_parsed_view_decodes_headers(smtp: SmtpServer) -> None:
    send(smtp)
    [message] = smtp.wait_for_messages(1)
    assert message.parsed["X-Folded"] == "first part second part"
    assert message.header_lines()[3:5] == [b"X-Folded: first part", b" second part"]


def test_smtp_latency_delays_the_data_reply(smtp: SmtpServer) -> None:
    smtp.latency = 0.3
    started = time.monotonic()
    send(smtp)
    assert time.monotonic() - started >= 0.3


def test_smtp_fails_next_data_then_accepts(smtp: SmtpServer) -> None:
    smtp.fail_next_data(451)
    with smtplib.SMTP(smtp.host, smtp.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as failed:
            client.sendmail(SENDER, [RECIPIENT], MESSAGE)
        client.sendmail(SENDER, [RECIPIENT], MESSAGE)
    assert failed.value.smtp_code == 451
    assert len(smtp.rejected) == 1
    assert len(smtp.messages) == 1


def test_smtp_fails_all_data_permanently(smtp: SmtpServer) -> None:
    smtp.fail_all_data(550)
    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as failed:
            send(smtp)
        assert failed.value.smtp_code == 550
    assert smtp.messages == []


def test_smtp_fails_next_rcpt(smtp: SmtpServer) -> None:
    smtp.fail_next_rcpt(550)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(smtp)


def test_smtp_counts_connections_not_messages(smtp: SmtpServer) -> None:
    with smtplib.SMTP(smtp.host, smtp.port, timeout=10) as client:
        client.sendmail(SENDER, [RECIPIENT], MESSAGE)
        client.sendmail(SENDER, [RECIPIENT], MESSAGE)
    smtp.wait_for_messages(2)
    assert smtp.connections == 1


def test_smtp_drop_after_data_disconnects_but_records(smtp: SmtpServer) -> None:
    smtp.drop_connection_after_data = True
    client = smtplib.SMTP(smtp.host, smtp.port, timeout=10)
    try:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail(SENDER, [RECIPIENT], MESSAGE)
    finally:
        client.close()
    assert [m.raw for m in smtp.messages] == [MESSAGE]


def test_smtp_reset_forgets_messages_and_behaviours(smtp: SmtpServer) -> None:
    send(smtp)
    smtp.fail_all_data(550)
    smtp.reset()
    send(smtp)
    assert len(smtp.messages) == 1


# SMTP server with STARTTLS and AUTH


def test_starttls_and_auth_with_the_test_ca(tls_smtp: SmtpServer, ca_pem_file: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca_pem_file))
    with smtplib.SMTP(tls_smtp.host, tls_smtp.port, timeout=10) as client:
        client.starttls(context=context)
        client.login("relay", "s3cret")
        client.sendmail(SENDER, [RECIPIENT], MESSAGE)
    [message] = tls_smtp.wait_for_messages(1)
    assert message.over_tls
    assert message.auth_login == "relay"


def test_auth_required_refuses_mail_without_login(tls_smtp: SmtpServer) -> None:
    with smtplib.SMTP(tls_smtp.host, tls_smtp.port, timeout=10) as client:
        client.starttls(context=tls_smtp.client_ssl_context())
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(SENDER, [RECIPIENT], MESSAGE)
    assert refused.value.smtp_code == 530


def test_auth_is_not_offered_before_starttls(tls_smtp: SmtpServer) -> None:
    with smtplib.SMTP(tls_smtp.host, tls_smtp.port, timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN AHJlbGF5AHMzY3JldA==")
    assert code == 538
    assert [(a.over_tls, a.succeeded) for a in tls_smtp.auth_attempts] == [(False, False)]


def test_auth_without_tls_can_be_allowed(tls_smtp: SmtpServer) -> None:
    tls_smtp.auth_require_tls = False
    with smtplib.SMTP(tls_smtp.host, tls_smtp.port, timeout=10) as client:
        client.login("relay", "s3cret")
    assert [(a.over_tls, a.succeeded) for a in tls_smtp.auth_attempts] == [(False, True)]


def test_require_starttls_refuses_mail_in_clear(tls_smtp: SmtpServer) -> None:
    tls_smtp.auth_required = False
    tls_smtp.require_starttls = True
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(tls_smtp)
    assert refused.value.smtp_code == 530


# relay subprocess helper, checked with a stand-in (the relay itself is tested elsewhere)

STAND_IN = """
import http.server, os, signal, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server = http.server.HTTPServer((os.environ["HTTP_HOST"], int(os.environ["PORT"])), Handler)
print("stand-in listening", flush=True)
print("LOG_LEVEL=" + os.environ["LOG_LEVEL"], file=sys.stderr, flush=True)
try:
    server.serve_forever()
finally:
    server.server_close()
"""


def test_relay_process_waits_for_readyz_and_stops_on_sigterm() -> None:
    with RelayProcess(command=[sys.executable, "-c", STAND_IN]) as relay:
        relay.wait_ready(timeout=10)
        relay.terminate()
        assert relay.wait(timeout=10) == 0
        assert relay.readyz_status() is None
        assert "stand-in listening" in relay.stdout()
        assert "LOG_LEVEL=debug" in relay.stderr()


def test_run_relay_once_returns_exit_code_and_output() -> None:
    script = "import sys; print('out'); print('bad config', file=sys.stderr); sys.exit(2)"
    code, out, err = run_relay_once(command=[sys.executable, "-c", script], timeout=10)
    assert (code, out.strip(), err.strip()) == (2, "out", "bad config")


def test_relay_env_drops_inherited_relay_and_aws_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PASSWORD", "from-the-shell")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-shell")
    env = relay_env({"EMAIL_ENABLED": "true", "LOG_LEVEL": None})
    assert "SMTP_PASSWORD" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "LOG_LEVEL" not in env
    assert env["EMAIL_ENABLED"] == "true"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert env["HTTP_HOST"] == "127.0.0.1"
