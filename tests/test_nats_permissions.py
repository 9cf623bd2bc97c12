"""The relay works with a NATS user holding only the permissions the chart gives it.

The permissions come from the chart itself (the ``natsPermissions`` ConfigMap,
rendered by the real Helm engine), are included in a nats-server
configuration exactly as docs/deployment.md tells operators to, and the
server enforces them: a grant missing from the list shows as a permissions
violation in the server's log and a failing request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from emailrelay import api
from tests.support.event_stream import wait_for_event
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.nats import NatsServer
from tests.support.servers.relay import RelayProcess, relay_defaults
from tests.support.servers.smtp import SmtpServer
from tests.support.waiting import wait_until

CHART_DIR = Path(__file__).resolve().parent.parent / "charts" / "emailrelay"
RELAY_USER, RELAY_PASSWORD = "emailrelay", "relay-secret"
CALLER_USER, CALLER_PASSWORD = "caller", "caller-secret"


def chart_permissions(values: dict[str, Any] | None = None) -> dict[str, str]:
    """The files of the chart's nats-permissions ConfigMap."""
    enabled = {"natsPermissions": {"configMap": {"enabled": True}}, **(values or {})}
    with helm_python.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(values=enabled, name="mail", namespace="lfx")
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if (
                doc
                and doc["kind"] == "ConfigMap"
                and doc["metadata"]["name"].endswith("-nats-permissions")
            ):
                data: dict[str, str] = doc["data"]
                return data
    raise AssertionError("the chart rendered no nats-permissions ConfigMap")


def server_config(directory: Path, snippet: str) -> Path:
    """A nats-server configuration that includes the chart's snippet, as documented."""
    (directory / "emailrelay-permissions.conf").write_text(snippet)
    config = directory / "nats-server.conf"
    config.write_text(
        'include "emailrelay-permissions.conf"\n'
        "authorization {\n"
        "  users = [\n"
        f'    {{user: "{RELAY_USER}", password: "{RELAY_PASSWORD}", '
        "permissions: $EMAILRELAY_PERMISSIONS}\n"
        f'    {{user: "{CALLER_USER}", password: "{CALLER_PASSWORD}"}}\n'
        "  ]\n"
        "}\n"
    )
    return config


def url_for(server: NatsServer, user: str, password: str) -> str:
    return server.url.replace("nats://", f"nats://{user}:{password}@")


def violations(server: NatsServer) -> list[str]:
    return [line for line in server.logs().splitlines() if "Violation" in line]


@pytest.fixture(scope="module")
def restricted_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    snippet = chart_permissions()["emailrelay-permissions.conf"]
    config = server_config(tmp_path_factory.mktemp("nats-permissions"), snippet)
    with NatsServer(extra_args=("--config", str(config))) as server:
        yield server


@pytest.fixture(scope="module")
def restricted_relay(
    restricted_nats: NatsServer, smtp_server: SmtpServer
) -> Iterator[RelayProcess]:
    env = {
        **relay_defaults(restricted_nats, smtp_server),
        "NATS_URL": url_for(restricted_nats, RELAY_USER, RELAY_PASSWORD),
    }
    with RelayProcess(env) as relay:
        relay.wait_ready()
        yield relay


@pytest.fixture(scope="module")
def caller(restricted_nats: NatsServer) -> Iterator[SyncNats]:
    with SyncNats(url_for(restricted_nats, CALLER_USER, CALLER_PASSWORD)) as client:
        yield client


def test_send_status_and_analytics_work_with_only_the_chart_permissions(
    restricted_relay: RelayProcess, caller: SyncNats, restricted_nats: NatsServer
) -> None:
    sent = caller.request_json(api.SEND_EMAIL_SUBJECT, send_request(group_id="least-privilege"))
    record = caller.request_json(api.GET_EMAIL_STATUS_SUBJECT, {"email_id": sent["email_id"]})
    group = caller.request_json(api.GET_EMAIL_STATUS_SUBJECT, {"group_id": "least-privilege"})
    counts = caller.request_json(
        api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT, {"group_id": "least-privilege"}
    )
    assert record["email_id"] == sent["email_id"]
    assert [r["email_id"] for r in group] == [sent["email_id"]]
    assert counts["total_sent"] == 1
    assert violations(restricted_nats) == []


def test_discovery_works_with_only_the_chart_permissions(
    restricted_relay: RelayProcess, caller: SyncNats, restricted_nats: NatsServer
) -> None:
    ping = json.loads(caller.request("$SRV.PING", b""))
    info = json.loads(caller.request("$SRV.INFO.emailrelay", b""))
    stats = json.loads(caller.request(f"$SRV.STATS.emailrelay.{info['id']}", b""))
    assert ping["name"] == info["name"] == stats["name"] == "emailrelay"
    assert violations(restricted_nats) == []


def test_the_server_enforces_the_list(
    restricted_relay: RelayProcess, restricted_nats: NatsServer
) -> None:
    with SyncNats(url_for(restricted_nats, RELAY_USER, RELAY_PASSWORD)) as relay_user:
        relay_user.publish("lfx.some-other-service.request", b"{}")
    wait_until(
        lambda: any("lfx.some-other-service.request" in v for v in violations(restricted_nats)),
        timeout=5,
        message="a subject outside the list was not refused",
    )


def test_queue_subscriptions_are_granted_only_in_the_queue_group() -> None:
    subscribe = json.loads(chart_permissions()["emailrelay-permissions.json"])["subscribe"]
    requests = [s for s in subscribe["allow"] if s.startswith("lfx.")]
    assert sorted(requests) == sorted(
        f"{subject} {api.QUEUE_GROUP}"
        for subject in (
            api.SEND_EMAIL_SUBJECT,
            api.GET_EMAIL_STATUS_SUBJECT,
            api.GET_EMAIL_ENGAGEMENT_ANALYTICS_SUBJECT,
            *api.SUPPRESSION_SUBJECTS,
            api.ERASE_RECIPIENT_DATA_SUBJECT,
        )
    )


def test_erasure_is_granted_by_name_never_through_a_wildcard() -> None:
    subscribe = json.loads(chart_permissions()["emailrelay-permissions.json"])["subscribe"]
    assert f"{api.ERASE_RECIPIENT_DATA_SUBJECT} {api.QUEUE_GROUP}" in subscribe["allow"]
    assert not [s for s in subscribe["allow"] if s.startswith("lfx.") and ">" in s]


def test_without_kv_auto_create_the_relay_may_not_create_streams() -> None:
    values = {"config": {"nats": {"kvAutoCreate": False}}}
    publish = json.loads(chart_permissions(values)["emailrelay-permissions.json"])["publish"]
    assert [s for s in publish["allow"] if ".CREATE." in s] == []


EVENTS_ON = {"config": {"events": {"streamEnabled": True}}}


@pytest.fixture(scope="module")
def events_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A server enforcing the chart's list for a release with the events stream on."""
    snippet = chart_permissions(EVENTS_ON)["emailrelay-permissions.conf"]
    config = server_config(tmp_path_factory.mktemp("nats-permissions-events"), snippet)
    with NatsServer(extra_args=("--config", str(config))) as server:
        yield server


def test_events_stream_works_with_only_the_chart_permissions(
    events_nats: NatsServer, smtp_server: SmtpServer
) -> None:
    env = {
        **relay_defaults(events_nats, smtp_server),
        "NATS_URL": url_for(events_nats, RELAY_USER, RELAY_PASSWORD),
        "EVENTS_STREAM_ENABLED": "true",
    }
    with (
        RelayProcess(env) as relay,
        SyncNats(url_for(events_nats, CALLER_USER, CALLER_PASSWORD)) as caller,
    ):
        relay.wait_ready()  # the stream looked up and created under the list
        sent = caller.request_json(api.SEND_EMAIL_SUBJECT, send_request())
        event = wait_for_event(caller, sent["email_id"], "sent")
    assert event["event_id"] == f"sent:{sent['email_id']}"
    assert violations(events_nats) == []
