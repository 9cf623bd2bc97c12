"""The Helm chart, rendered and linted offline by the real Helm engine.

``helm-python-sdk`` binds Helm's Go SDK (no ``helm`` binary): ``Chart.load``,
``Chart.render`` and ``lint`` are the same code paths as ``helm template`` and
``helm lint``. Assertions are made on the parsed objects, not on text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import helm_python
import pytest

from emailrelay import app
from emailrelay.config import Settings
from emailrelay.store.buckets import IDEMPOTENCY_MAX_VALUE, SUPPRESSIONS
from tests.support.chart import (
    CHART_DIR,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    lint_problems,
    only,
    render,
)

# Every contract variable the chart renders by default, with its default.
CONTRACT_DEFAULTS = {
    "NATS_URL": "nats://localhost:4222",
    "NATS_CONNECT_TIMEOUT": "30s",
    "PORT": "8080",
    "HTTP_HOST": "0.0.0.0",
    "EMAIL_ENABLED": "false",
    "SMTP_HOST": "localhost",
    "SMTP_PORT": "587",
    "SMTP_TLS_MODE": "auto",
    "SMTP_POOL_SIZE": "64",
    "SMTP_CONNECTION_MAX_MESSAGES": "100",
    "SMTP_CONNECTION_MAX_AGE": "300s",
    "DEFAULT_SMTP_FROM": "noreply@lfx.linuxfoundation.org",
    "DEFAULT_SMTP_FROM_DISPLAY_NAME": "LFX Self Serve",
    "SMTP_ALLOWED_FROM_DOMAINS": "lfx.linuxfoundation.org",
    "SMTP_ALLOWED_REPLY_TO_DOMAINS": "linuxfoundation.org",
    "SMTP_ALLOWED_RECIPIENT_DOMAINS": "",
    "SES_EVENTING_ENABLED": "false",
    "SES_EVENT_MAX_RECEIVES": "5",
    "MAX_IN_FLIGHT": "256",
    "MAX_BACKLOG": "256",
    "SEND_TIMEOUT": "8s",
    "TRACKING_WAIT": "1s",
    "MAX_READS_IN_FLIGHT": "16",
    "SHUTDOWN_GRACE_SECONDS": "25",
    "KV_REPLICAS": "1",
    "KV_AUTO_CREATE": "true",
    "LOG_LEVEL": "info",
    "LOG_FORMAT": "json",
    "LOG_ADD_SOURCE": "false",
    "EMAIL_TRANSPORT": "smtp",
}

# Values that switch on every optional object.
EVERYTHING: dict[str, Any] = {
    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
    "kv": {"enabled": True, "replicas": 3},
    "secret": {"create": False},
    "externalSecret": {
        "enabled": True,
        "secretStoreRef": {"name": "aws-secrets-manager", "kind": "ClusterSecretStore"},
        "data": [
            {
                "secretKey": "smtp-username",
                "remoteRef": {"key": "lfx/emailrelay/smtp", "property": "username"},
            },
            {
                "secretKey": "smtp-password",
                "remoteRef": {"key": "lfx/emailrelay/smtp", "property": "password"},
            },
        ],
    },
    "natsCreds": {"enabled": True, "secretName": "emailrelay-nats"},
    "serviceAccount": {"roleArn": "arn:aws:iam::123456789012:role/emailrelay"},
    "config": {
        "email": {"enabled": True},
        "ses": {
            "eventingEnabled": True,
            "engagementSqsQueueUrl": "https://sqs.us-west-2.amazonaws.com/123456789012/ses",
            "configurationSet": "lfx",
        },
        "aws": {"region": "us-west-2"},
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(obj["kind"] for obj in objects)


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def env_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The container's env entries by name (names must be unique)."""
    entries = container(objects)["env"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {entry["name"]: entry for entry in entries}


def plain_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {name: e["value"] for name, e in env_of(objects).items() if "value" in e}


# --- lint -------------------------------------------------------------------


def test_lint_passes_with_defaults() -> None:
    report = helm_python.lint(CHART_DIR, strict=True)
    assert report["total_charts_linted"] == 1
    assert lint_problems(report) == []


def test_lint_passes_with_everything_enabled() -> None:
    report = helm_python.lint(CHART_DIR, EVERYTHING, strict=True)
    assert lint_problems(report) == []


# --- defaults ---------------------------------------------------------------


def test_defaults_render_deployment_service_serviceaccount_pdb_and_secret(
    chart: helm_python.Chart,
) -> None:
    assert kinds(render(chart)) == [
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
    ]


def test_defaults_render_no_hpa_keyvalue_or_externalsecret(chart: helm_python.Chart) -> None:
    rendered = set(kinds(render(chart)))
    assert rendered.isdisjoint({"HorizontalPodAutoscaler", "KeyValue", "ExternalSecret"})


def test_objects_are_named_after_the_release_in_its_namespace(chart: helm_python.Chart) -> None:
    for obj in render(chart):
        assert obj["metadata"]["name"] == FULLNAME
        assert obj["metadata"]["namespace"] == NAMESPACE


def test_image_tag_defaults_to_app_version_and_default_command_is_serve(
    chart: helm_python.Chart,
) -> None:
    c = container(render(chart))
    assert c["image"] == f"emailrelay:{chart.metadata['appVersion']}"
    assert c["args"] == ["serve"]
    assert "command" not in c


def test_chart_metadata_is_v2_with_app_version_0_1_0(chart: helm_python.Chart) -> None:
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.metadata["appVersion"] == "0.1.0"


# --- probes, ports, shutdown ---------------------------------------------------


def test_probes_hit_livez_and_readyz_on_the_http_port(chart: helm_python.Chart) -> None:
    c = container(render(chart))
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}


def test_config_port_moves_container_port_and_port_env(chart: helm_python.Chart) -> None:
    objects = render(chart, {"config": {"http": {"port": 9090}}})
    assert container(objects)["ports"][0]["containerPort"] == 9090
    assert plain_env(objects)["PORT"] == "9090"
    assert only(objects, "Service")["spec"]["ports"][0]["targetPort"] == "http"


def test_service_exposes_port_8080_named_http(chart: helm_python.Chart) -> None:
    service = only(render(chart), "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/name": "emailrelay",
        "app.kubernetes.io/instance": RELEASE,
    }


def test_termination_grace_exceeds_shutdown_grace_by_default(chart: helm_python.Chart) -> None:
    objects = render(chart)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    grace = int(plain_env(objects)["SHUTDOWN_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > grace
    assert pod["terminationGracePeriodSeconds"] == grace + 12


def test_termination_grace_extra_covers_what_runs_after_the_shutdown_grace(
    chart: helm_python.Chart,
) -> None:
    """Beyond SHUTDOWN_GRACE_SECONDS a SIGTERM'd relay still runs the cut-off
    requests' last DATA reply and key write, a tracking wait, the pending
    writes' last try and the NATS drain; computed here from the code's own
    constants and the chart's TRACKING_WAIT, so a default that grows past the
    chart's extra seconds fails this test."""
    objects = render(chart)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    grace = int(plain_env(objects)["SHUTDOWN_GRACE_SECONDS"])
    tracking_wait = Settings.model_validate(
        {"TRACKING_WAIT": plain_env(objects)["TRACKING_WAIT"]}
    ).tracking_wait
    assert pod["terminationGracePeriodSeconds"] - grace >= app.shutdown_extra_seconds(tracking_wait)


def test_termination_grace_follows_a_changed_shutdown_grace(chart: helm_python.Chart) -> None:
    objects = render(chart, {"config": {"shutdownGraceSeconds": 60}})
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert plain_env(objects)["SHUTDOWN_GRACE_SECONDS"] == "60"
    assert pod["terminationGracePeriodSeconds"] == 72


def test_termination_grace_not_above_shutdown_grace_is_rejected(
    chart: helm_python.Chart,
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="must exceed"):
        render(chart, {"terminationGracePeriodSeconds": 25})


# --- security -----------------------------------------------------------------


def test_pod_runs_as_non_root_with_a_read_only_root_filesystem(chart: helm_python.Chart) -> None:
    objects = render(chart)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    sc = container(objects)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True


def test_container_drops_all_capabilities_without_privilege_escalation(
    chart: helm_python.Chart,
) -> None:
    objects = render(chart)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    sc = container(objects)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_tmp_is_a_writable_empty_dir(chart: helm_python.Chart) -> None:
    objects = render(chart)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container(objects)["volumeMounts"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp


def test_service_account_token_is_not_mounted(chart: helm_python.Chart) -> None:
    objects = render(chart)
    assert only(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == FULLNAME


def test_resources_have_requests_and_a_memory_limit(chart: helm_python.Chart) -> None:
    resources = container(render(chart))["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert "memory" in resources["limits"]


# --- scheduling -------------------------------------------------------------------


def test_pods_spread_over_zones_and_nodes(chart: helm_python.Chart) -> None:
    pod = only(render(chart), "Deployment")["spec"]["template"]["spec"]
    constraints = pod["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    for c in constraints:
        assert c["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE


def test_pdb_allows_one_disruption_of_the_release_pods(chart: helm_python.Chart) -> None:
    objects = render(chart)
    pdb = only(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == only(objects, "Deployment")["spec"]["selector"]


def test_pods_carry_prometheus_scrape_annotations(chart: helm_python.Chart) -> None:
    annotations = only(render(chart), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"


# --- environment -----------------------------------------------------------------


def test_env_holds_contract_variables_with_their_defaults(chart: helm_python.Chart) -> None:
    env = plain_env(render(chart))
    assert {name: env.get(name) for name in CONTRACT_DEFAULTS} == CONTRACT_DEFAULTS


def test_env_omits_unset_optional_variables_by_default(chart: helm_python.Chart) -> None:
    env = env_of(render(chart))
    for name in (
        "SES_CONFIGURATION_SET",
        "SES_ENGAGEMENT_SQS_QUEUE_URL",
        "AWS_REGION",
        "NATS_CREDS",
    ):
        assert name not in env


def test_every_config_key_reaches_its_env_variable(chart: helm_python.Chart) -> None:
    config = {
        "nats": {
            "url": "nats://nats:4222",
            "connectTimeout": "45s",
            "kvReplicas": 3,
            "kvAutoCreate": False,
        },
        "http": {"port": 8081, "host": "127.0.0.1"},
        "email": {"enabled": True, "suppressionEnabled": True, "transport": "ses"},
        "smtp": {
            "maxSendRate": 12.5,
            "host": "email-smtp.us-west-2.amazonaws.com",
            "port": 465,
            "tlsMode": "implicit",
            "poolSize": 4,
            "connectionMaxMessages": 50,
            "connectionMaxAge": "60s",
            "defaultFrom": "robot@lfx.linuxfoundation.org",
            "defaultFromDisplayName": "LFX Robot",
            "allowedFromDomains": "lfx.linuxfoundation.org,example.org",
            "allowedReplyToDomains": "example.org",
            "allowedRecipientDomains": "example.com",
        },
        "ses": {
            "configurationSet": "lfx-set",
            "eventingEnabled": True,
            "engagementSqsQueueUrl": "https://sqs.us-west-2.amazonaws.com/1/q",
            "eventMaxReceives": 7,
        },
        "events": {
            "streamEnabled": True,
            "maxAge": "48h",
            "maxBytes": 1048576,
            "duplicateWindow": "5m",
        },
        "limits": {
            "maxInFlight": 64,
            "maxBacklog": 32,
            "maxReadsInFlight": 8,
            "sendTimeout": "10s",
            "trackingWait": "2s",
            "idempotencyTtl": "2h",
        },
        "shutdownGraceSeconds": 40,
        "log": {"level": "debug", "format": "text", "addSource": True},
        "aws": {
            "region": "us-west-2",
            "endpointUrlSqs": "http://localhost:5000",
            "endpointUrlSesv2": "http://localhost:5001",
        },
    }
    env = plain_env(render(chart, {"config": config}))
    assert env == {
        "NATS_URL": "nats://nats:4222",
        "NATS_CONNECT_TIMEOUT": "45s",
        "KV_REPLICAS": "3",
        "KV_AUTO_CREATE": "false",
        "PORT": "8081",
        "HTTP_HOST": "127.0.0.1",
        "EMAIL_ENABLED": "true",
        "EMAIL_TRANSPORT": "ses",
        "SUPPRESSION_ENABLED": "true",
        "SMTP_MAX_SEND_RATE": "12.5",
        "IDEMPOTENCY_TTL": "2h",
        "SMTP_HOST": "email-smtp.us-west-2.amazonaws.com",
        "SMTP_PORT": "465",
        "SMTP_TLS_MODE": "implicit",
        "SMTP_POOL_SIZE": "4",
        "SMTP_CONNECTION_MAX_MESSAGES": "50",
        "SMTP_CONNECTION_MAX_AGE": "60s",
        "DEFAULT_SMTP_FROM": "robot@lfx.linuxfoundation.org",
        "DEFAULT_SMTP_FROM_DISPLAY_NAME": "LFX Robot",
        "SMTP_ALLOWED_FROM_DOMAINS": "lfx.linuxfoundation.org,example.org",
        "SMTP_ALLOWED_REPLY_TO_DOMAINS": "example.org",
        "SMTP_ALLOWED_RECIPIENT_DOMAINS": "example.com",
        "SES_CONFIGURATION_SET": "lfx-set",
        "SES_EVENTING_ENABLED": "true",
        "SES_ENGAGEMENT_SQS_QUEUE_URL": "https://sqs.us-west-2.amazonaws.com/1/q",
        "SES_EVENT_MAX_RECEIVES": "7",
        "EVENTS_STREAM_ENABLED": "true",
        "EVENTS_MAX_AGE": "48h",
        "EVENTS_MAX_BYTES": "1048576",
        "EVENTS_DUPLICATE_WINDOW": "5m",
        "MAX_IN_FLIGHT": "64",
        "MAX_BACKLOG": "32",
        "MAX_READS_IN_FLIGHT": "8",
        "SEND_TIMEOUT": "10s",
        "TRACKING_WAIT": "2s",
        "SHUTDOWN_GRACE_SECONDS": "40",
        "LOG_LEVEL": "debug",
        "LOG_FORMAT": "text",
        "LOG_ADD_SOURCE": "true",
        "AWS_REGION": "us-west-2",
        "AWS_ENDPOINT_URL_SQS": "http://localhost:5000",
        "AWS_ENDPOINT_URL_SESV2": "http://localhost:5001",
    }


def test_large_integers_render_without_an_exponent(chart: helm_python.Chart) -> None:
    env = plain_env(render(chart, {"config": {"limits": {"maxInFlight": 2_000_000}}}))
    assert env["MAX_IN_FLIGHT"] == "2000000"


@pytest.mark.parametrize("key", ["allowedFromDomains", "allowedReplyToDomains"])
def test_empty_allowlist_renders_as_an_empty_env_var(chart: helm_python.Chart, key: str) -> None:
    env = env_of(render(chart, {"config": {"smtp": {key: ""}}}))
    name = {
        "allowedFromDomains": "SMTP_ALLOWED_FROM_DOMAINS",
        "allowedReplyToDomains": "SMTP_ALLOWED_REPLY_TO_DOMAINS",
    }[key]
    assert env[name] == {"name": name, "value": ""}


@pytest.mark.parametrize("key", ["allowedFromDomains", "allowedReplyToDomains"])
def test_null_allowlist_omits_the_env_var(chart: helm_python.Chart, key: str) -> None:
    env = env_of(render(chart, {"config": {"smtp": {key: None}}}))
    name = {
        "allowedFromDomains": "SMTP_ALLOWED_FROM_DOMAINS",
        "allowedReplyToDomains": "SMTP_ALLOWED_REPLY_TO_DOMAINS",
    }[key]
    assert name not in env
    assert "SMTP_HOST" in env  # only that one variable went away


def test_extra_env_replaces_the_config_variable_of_the_same_name(
    chart: helm_python.Chart,
) -> None:
    extra = [
        {"name": "LOG_LEVEL", "value": "debug"},
        {"name": "SMTP_FROM", "value": "legacy@lfx.linuxfoundation.org"},
    ]
    env = env_of(render(chart, {"extraEnv": extra}))
    assert env["LOG_LEVEL"] == {"name": "LOG_LEVEL", "value": "debug"}
    assert env["SMTP_FROM"]["value"] == "legacy@lfx.linuxfoundation.org"


def test_invalid_tls_mode_is_rejected(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="tlsMode"):
        render(chart, {"config": {"smtp": {"tlsMode": "ssl"}}})


# --- secrets ----------------------------------------------------------------------


def test_smtp_credentials_are_secret_references(chart: helm_python.Chart) -> None:
    env = env_of(render(chart))
    for name, key in (("SMTP_USERNAME", "smtp-username"), ("SMTP_PASSWORD", "smtp-password")):
        assert "value" not in env[name]
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": FULLNAME, "key": key}}


def test_chart_created_secret_holds_the_credentials_from_values(
    chart: helm_python.Chart,
) -> None:
    values = {"secret": {"stringData": {"smtp-username": "AKIA", "smtp-password": "s3cret"}}}
    objects = render(chart, values)
    secret = only(objects, "Secret")
    assert secret["stringData"] == {"smtp-username": "AKIA", "smtp-password": "s3cret"}
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" in annotations


def test_existing_secret_is_referenced_and_not_created(chart: helm_python.Chart) -> None:
    objects = render(chart, {"secret": {"existingSecret": "smtp-creds"}})
    assert "Secret" not in kinds(objects)
    env = env_of(objects)
    assert env["SMTP_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "smtp-creds"


def test_existing_secret_and_external_secret_together_are_rejected(
    chart: helm_python.Chart,
) -> None:
    values = {
        "secret": {"existingSecret": "smtp-creds"},
        "externalSecret": EVERYTHING["externalSecret"],
    }
    with pytest.raises(helm_python.HelmRenderError, match="mutually exclusive"):
        render(chart, values)


def test_ses_settings_listed_in_the_secret_replace_plain_values(
    chart: helm_python.Chart,
) -> None:
    values = {
        "config": {"ses": {"configurationSet": "plain"}},
        "secret": {"env": {"SES_CONFIGURATION_SET": "ses-configuration-set"}},
    }
    env = env_of(render(chart, values))
    assert env["SES_CONFIGURATION_SET"]["valueFrom"]["secretKeyRef"] == {
        "name": FULLNAME,
        "key": "ses-configuration-set",
    }
    assert "SMTP_USERNAME" in env  # the default mappings stay


def test_optional_secret_references_are_marked_optional(chart: helm_python.Chart) -> None:
    env = env_of(render(chart, {"secret": {"optional": True}}))
    assert env["SMTP_USERNAME"]["valueFrom"]["secretKeyRef"]["optional"] is True


# --- everything enabled -------------------------------------------------------------


def test_everything_enabled_renders_every_object(chart: helm_python.Chart) -> None:
    assert kinds(render(chart, EVERYTHING)) == [
        "Deployment",
        "ExternalSecret",
        "HorizontalPodAutoscaler",
        "KeyValue",
        "KeyValue",
        "KeyValue",
        "KeyValue",
        "KeyValue",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]


def test_hpa_scales_the_deployment_which_drops_fixed_replicas(chart: helm_python.Chart) -> None:
    objects = render(chart, EVERYTHING)
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in only(objects, "Deployment")["spec"]


def test_kv_buckets_render_as_nack_keyvalues(chart: helm_python.Chart) -> None:
    buckets = {
        obj["spec"]["bucket"]: obj for obj in render(chart, EVERYTHING) if obj["kind"] == "KeyValue"
    }
    assert set(buckets) == {
        "email-recipients",
        "email-group-index",
        "email-idempotency",
        "email-suppressions",
        "email-recipient-index",
    }
    for obj in buckets.values():
        assert obj["apiVersion"] == "jetstream.nats.io/v1beta2"
        assert obj["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert {b: (o["spec"]["history"], o["spec"]["storage"]) for b, o in buckets.items()} == {
        "email-recipients": (1, "file"),
        "email-group-index": (1, "file"),
        "email-idempotency": (1, "file"),
        "email-suppressions": (1, "file"),
        "email-recipient-index": (1, "file"),
    }
    assert buckets["email-recipients"]["spec"]["maxValueSize"] == 64 * 1024
    assert buckets["email-group-index"]["spec"]["maxValueSize"] == 1024 * 1024
    assert buckets["email-idempotency"]["spec"]["maxValueSize"] == IDEMPOTENCY_MAX_VALUE
    assert buckets["email-suppressions"]["spec"]["maxValueSize"] == SUPPRESSIONS.max_value_size
    assert {o["spec"]["replicas"] for o in buckets.values()} == {3}


def test_events_stream_renders_beside_the_buckets_only_when_enabled(
    chart: helm_python.Chart,
) -> None:
    assert "Stream" not in kinds(render(chart, {"kv": {"enabled": True}}))
    values = {"kv": {"enabled": True, "replicas": 3}, "config": {"events": {"streamEnabled": True}}}
    stream = only(render(chart, values), "Stream")
    assert stream["apiVersion"] == "jetstream.nats.io/v1beta2"
    assert stream["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert stream["spec"] == {
        "name": "EMAIL_EVENTS",
        "subjects": ["lfx.email-service.events.>"],
        "storage": "file",
        "discard": "old",
        "replicas": 3,
        "maxAge": "720h",
        "maxBytes": 1024**3,
        "duplicateWindow": "2m",
    }


def test_events_stream_limits_match_the_relays_defaults(chart: helm_python.Chart) -> None:
    values = {"kv": {"enabled": True}, "config": {"events": {"streamEnabled": True}}}
    spec = only(render(chart, values), "Stream")["spec"]
    defaults = Settings()
    assert spec["maxBytes"] == defaults.events_max_bytes
    assert (spec["maxAge"], spec["duplicateWindow"]) == ("720h", "2m")
    assert (defaults.events_max_age, defaults.events_duplicate_window) == (720 * 3600, 120)


def test_kv_bucket_replicas_default_to_kv_replicas_config(chart: helm_python.Chart) -> None:
    values = {"kv": {"enabled": True}, "config": {"nats": {"kvReplicas": 5}}}
    buckets = [obj for obj in render(chart, values) if obj["kind"] == "KeyValue"]
    assert [b["spec"]["replicas"] for b in buckets] == [5, 5, 5, 5, 5]


def test_retention_is_the_ttl_of_the_tracking_buckets_only(chart: helm_python.Chart) -> None:
    values = {"kv": {"enabled": True}, "config": {"limits": {"retention": "2160h"}}}
    ttl = {
        obj["spec"]["bucket"]: obj["spec"].get("ttl")
        for obj in render(chart, values)
        if obj["kind"] == "KeyValue"
    }
    assert ttl == {
        "email-recipients": "2160h",
        "email-group-index": "2160h",
        "email-recipient-index": "2160h",
        "email-idempotency": "24h",
        "email-suppressions": None,
    }
    assert env_of(render(chart, values))["RETENTION"]["value"] == "2160h"


def test_idempotency_bucket_ttl_matches_the_relays_default(chart: helm_python.Chart) -> None:
    values = {"kv": {"enabled": True}}
    (bucket,) = [
        obj
        for obj in render(chart, values)
        if obj["kind"] == "KeyValue" and obj["spec"]["bucket"] == "email-idempotency"
    ]
    assert bucket["spec"]["ttl"] == "24h"
    assert env_of(render(chart, values))["IDEMPOTENCY_TTL"]["value"] == bucket["spec"]["ttl"]


def test_idempotency_bucket_ttl_is_derived_from_the_relays_setting(
    chart: helm_python.Chart,
) -> None:
    values = {"kv": {"enabled": True}, "config": {"limits": {"idempotencyTtl": "2h"}}}
    (bucket,) = [
        obj
        for obj in render(chart, values)
        if obj["kind"] == "KeyValue" and obj["spec"]["bucket"] == "email-idempotency"
    ]
    assert bucket["spec"]["ttl"] == "2h"
    assert env_of(render(chart, values))["IDEMPOTENCY_TTL"]["value"] == "2h"


def test_external_secret_feeds_the_secret_the_pod_reads(chart: helm_python.Chart) -> None:
    objects = render(chart, EVERYTHING)
    es = only(objects, "ExternalSecret")
    assert es["apiVersion"] == "external-secrets.io/v1beta1"
    assert es["spec"]["secretStoreRef"] == {
        "name": "aws-secrets-manager",
        "kind": "ClusterSecretStore",
    }
    assert es["spec"]["target"]["name"] == FULLNAME
    assert [d["secretKey"] for d in es["spec"]["data"]] == ["smtp-username", "smtp-password"]
    assert "Secret" not in kinds(objects)
    env = env_of(objects)
    assert env["SMTP_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == FULLNAME


def test_nats_creds_secret_is_mounted_and_named_by_nats_creds(chart: helm_python.Chart) -> None:
    objects = render(chart, EVERYTHING)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "nats-creds")
    assert volume["secret"]["secretName"] == "emailrelay-nats"
    mount = next(m for m in container(objects)["volumeMounts"] if m["name"] == "nats-creds")
    assert mount["readOnly"] is True
    assert plain_env(objects)["NATS_CREDS"] == f"{mount['mountPath']}/nats.creds"


def test_nats_creds_without_a_secret_name_is_rejected(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=r"natsCreds\.secretName"):
        render(chart, {"natsCreds": {"enabled": True}})


def test_irsa_role_arn_annotates_the_service_account(chart: helm_python.Chart) -> None:
    sa = only(render(chart, EVERYTHING), "ServiceAccount")
    assert sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/emailrelay"
    }


def test_every_setting_the_relay_reads_is_reachable_from_the_chart() -> None:
    chart_text = "\n".join(
        path.read_text() for path in CHART_DIR.rglob("*") if path.suffix in {".yaml", ".tpl"}
    )
    settings = {field.alias for field in Settings.model_fields.values() if field.alias}
    assert settings, "no settings found"
    assert sorted(name for name in settings if name not in chart_text) == []


# --- NATS permissions ------------------------------------------------------------


def test_defaults_render_no_nats_permissions_configmap(chart: helm_python.Chart) -> None:
    assert "ConfigMap" not in kinds(render(chart))


def nats_permissions(chart: helm_python.Chart, values: dict[str, Any]) -> dict[str, Any]:
    objects = render(chart, {"natsPermissions": {"configMap": {"enabled": True}}, **values})
    config_map = only(objects, "ConfigMap")
    assert config_map["metadata"]["name"] == f"{FULLNAME}-nats-permissions"
    permissions: dict[str, Any] = json.loads(config_map["data"]["emailrelay-permissions.json"])
    return permissions


def test_nats_permissions_conf_defines_the_variable_holding_the_json(
    chart: helm_python.Chart,
) -> None:
    objects = render(chart, {"natsPermissions": {"configMap": {"enabled": True}}})
    data = only(objects, "ConfigMap")["data"]
    name, _, value = data["emailrelay-permissions.conf"].strip().partition(" = ")
    assert name == "EMAILRELAY_PERMISSIONS"
    assert json.loads(value) == json.loads(data["emailrelay-permissions.json"])


def test_nats_permissions_publish_only_to_the_relays_buckets_and_reply_by_responses(
    chart: helm_python.Chart,
) -> None:
    permissions = nats_permissions(chart, {})
    assert permissions["allow_responses"] is True
    buckets = (
        "email-recipients",
        "email-group-index",
        "email-idempotency",
        "email-suppressions",
        "email-recipient-index",
    )
    for subject in permissions["publish"]["allow"]:
        assert any(bucket in subject for bucket in buckets), subject
    assert "_INBOX.>" not in permissions["publish"]["allow"]


def test_nats_permissions_grant_the_events_stream_only_when_enabled(
    chart: helm_python.Chart,
) -> None:
    events = {
        "lfx.email-service.events.>",
        "$JS.API.STREAM.INFO.EMAIL_EVENTS",
        "$JS.API.STREAM.CREATE.EMAIL_EVENTS",
    }
    assert events.isdisjoint(nats_permissions(chart, {})["publish"]["allow"])
    enabled = nats_permissions(chart, {"config": {"events": {"streamEnabled": True}}})
    assert events <= set(enabled["publish"]["allow"])


def test_nats_permissions_extra_subjects_are_appended(chart: helm_python.Chart) -> None:
    permissions = nats_permissions(
        chart, {"natsPermissions": {"configMap": {"enabled": True}, "extraPublish": ["otel.>"]}}
    )
    assert permissions["publish"]["allow"][-1] == "otel.>"


# --- alerts -------------------------------------------------------------------------

ALERTS = {
    "EmailRelayTrackingWritesPending": "emailrelay_tracking_pending{",
    "EmailRelayTrackingWritesDropped": "emailrelay_tracking_pending_dropped_total",
    "EmailRelayEventLoopLag": "emailrelay_event_loop_lag_seconds",
    "EmailRelaySqsReceiveErrors": "emailrelay_sqs_receive_errors_total",
    "EmailRelayRestarting": "kube_pod_container_status_restarts_total",
    "EmailRelayReplicasNotReady": "kube_deployment_status_replicas_ready",
    "EmailRelayNoReplicaReady": "kube_deployment_status_replicas_ready",
    "EmailRelayRequestsExpired": "emailrelay_requests_expired_total",
    "EmailRelaySesSendingPaused": "emailrelay_ses_sending_paused_total",
}
DEPLOYMENT_DOC = CHART_DIR.parent.parent / "docs" / "deployment.md"


def alert_rules(chart: helm_python.Chart, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rule = only(render(chart, {"prometheusRule": {"enabled": True, **values}}), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    [group] = rule["spec"]["groups"]
    return {r["alert"]: r for r in group["rules"]}


def test_defaults_render_no_prometheus_rule(chart: helm_python.Chart) -> None:
    assert "PrometheusRule" not in kinds(render(chart))


def test_lint_passes_with_alerts_and_permissions_enabled() -> None:
    values = {
        "prometheusRule": {"enabled": True, "runbookBaseUrl": "https://example.org/runbook"},
        "natsPermissions": {"configMap": {"enabled": True}},
    }
    assert lint_problems(helm_python.lint(CHART_DIR, values, strict=True)) == []


def test_prometheus_rule_alerts_on_each_metric(chart: helm_python.Chart) -> None:
    rules = alert_rules(chart, {})
    assert {
        name: metric in rules[name]["expr"] for name, metric in ALERTS.items()
    } == dict.fromkeys(ALERTS, True)
    assert set(rules) == set(ALERTS)


def test_every_alert_has_a_severity_a_summary_and_a_description(
    chart: helm_python.Chart,
) -> None:
    for name, rule in alert_rules(chart, {}).items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name


def test_alerts_select_the_release_pods_in_its_namespace(chart: helm_python.Chart) -> None:
    for name, rule in alert_rules(chart, {}).items():
        assert f'namespace="{NAMESPACE}"' in rule["expr"], name
        assert FULLNAME in rule["expr"], name


def test_alert_selector_can_be_replaced(chart: helm_python.Chart) -> None:
    rules = alert_rules(chart, {"selector": 'job="emailrelay"'})
    assert (
        'emailrelay_tracking_pending{job="emailrelay"}'
        in rules["EmailRelayTrackingWritesPending"]["expr"]
    )


def test_alerts_link_their_runbook_section(chart: helm_python.Chart) -> None:
    rules = alert_rules(chart, {"runbookBaseUrl": "https://example.org/deployment.md"})
    for name, rule in rules.items():
        assert rule["annotations"]["runbook_url"] == (
            f"https://example.org/deployment.md#{name.lower()}"
        )


def test_every_alert_has_a_runbook_in_the_deployment_docs() -> None:
    headings = {
        line.removeprefix("### ").strip()
        for line in DEPLOYMENT_DOC.read_text().splitlines()
        if line.startswith("### ")
    }
    assert sorted(set(ALERTS) - headings) == []


def test_alerts_can_be_left_out_by_name(chart: helm_python.Chart) -> None:
    rules = alert_rules(chart, {"disabled": ["EmailRelayRestarting"]})
    assert "EmailRelayRestarting" not in rules
    assert len(rules) == len(ALERTS) - 1


def test_alert_thresholds_come_from_values(chart: helm_python.Chart) -> None:
    rules = alert_rules(chart, {"loopLagSeconds": 2, "loopLagFor": "1m"})
    assert rules["EmailRelayEventLoopLag"]["expr"].endswith("> 2")
    assert rules["EmailRelayEventLoopLag"]["for"] == "1m"
