"""The Grafana dashboard the chart ships (``dashboards.enabled``), rendered by
the real Helm engine as in ``test_chart.py``, and checked against the metrics a
running relay really exposes on ``/metrics``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import helm_python
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from emailrelay.health import health_app
from tests.support.chart import CHART_DIR, FULLNAME, NAMESPACE, lint_problems, only, render
from tests.support.servers.relay import RelayProcess

PANEL_TITLES = [
    "Sends per second by outcome (and transport)",
    "Reply latency quantiles",
    "SMTP pool in use",
    "Throttling and send rate",
    "Tracking writes pending and failed",
    "Engagement events by type",
    "SQS receive errors",
    "Event-loop lag",
    "Readiness per pod",
]
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "unknown": ("",),
}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


def dashboard_configmap(chart: helm_python.Chart, **values: Any) -> dict[str, Any]:
    objects = render(chart, {"dashboards": {"enabled": True, **values}})
    return only(objects, "ConfigMap")


def dashboard(chart: helm_python.Chart) -> dict[str, Any]:
    data = dashboard_configmap(chart)["data"]
    assert list(data) == ["emailrelay.json"]
    loaded: dict[str, Any] = json.loads(data["emailrelay.json"])
    return loaded


def queries(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


def variable_queries(board: dict[str, Any]) -> list[str]:
    """The series each query variable reads (``label_values(series, label)``)."""
    return [
        re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", variable["query"]["query"])
        for variable in board["templating"]["list"]
        if variable["type"] == "query"
    ]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads: what is left once strings,
    label matchers, ranges, grouping clauses and function names are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set(re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text))
    return {name for name in names if name.lower() not in PROMQL_WORDS}


def exposed_series(metrics_text: str) -> set[str]:
    """Every series name ``/metrics`` can hold, histogram and counter suffixes included."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(metrics_text)
        for suffix in SERIES_SUFFIXES[family.type]
    }


def test_defaults_render_no_dashboard(chart: helm_python.Chart) -> None:
    assert "ConfigMap" not in [obj["kind"] for obj in render(chart)]


def test_lint_passes_with_the_dashboard_enabled() -> None:
    report = helm_python.lint(CHART_DIR, values={"dashboards": {"enabled": True}})
    assert lint_problems(report) == []


def test_dashboard_configmap_carries_the_grafana_sidecar_label(chart: helm_python.Chart) -> None:
    configmap = dashboard_configmap(chart)
    assert configmap["metadata"]["name"] == f"{FULLNAME}-dashboard"
    assert configmap["metadata"]["namespace"] == NAMESPACE
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_dashboard_label_key_and_value_can_be_changed(chart: helm_python.Chart) -> None:
    labels = dashboard_configmap(chart, label="dashboards", labelValue="emailrelay")["metadata"][
        "labels"
    ]
    assert labels["dashboards"] == "emailrelay"
    assert "grafana_dashboard" not in labels


def test_dashboard_configmap_can_go_to_grafanas_namespace(chart: helm_python.Chart) -> None:
    configmap = dashboard_configmap(
        chart, namespace="monitoring", annotations={"grafana_folder": "Email"}
    )
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Email"}


def test_dashboard_has_a_stable_uid_and_datasource_namespace_and_pod_variables(
    chart: helm_python.Chart,
) -> None:
    board = dashboard(chart)
    assert board["uid"] == "emailrelay-overview"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "pod"} <= set(variables)
    for expr in queries(board):
        assert 'namespace=~"$namespace"' in expr, expr
        assert 'pod=~"$pod"' in expr, expr


@pytest.mark.parametrize("title", PANEL_TITLES)
def test_dashboard_has_the_panel(chart: helm_python.Chart, title: str) -> None:
    panels = [panel for panel in dashboard(chart)["panels"] if panel["title"] == title]
    assert len(panels) == 1
    assert panels[0]["targets"], f"{title} has no query"
    assert all(t["datasource"]["uid"] == "${datasource}" for t in panels[0]["targets"])


def test_metric_names_are_read_out_of_promql() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le) (rate(emailrelay_request_seconds_bucket"
        '{pod=~"$pod", subject="a.b"}[$__rate_interval]))) or emailrelay_ready'
    )
    assert metric_names(expr) == {"emailrelay_request_seconds_bucket", "emailrelay_ready"}


def test_every_dashboard_query_reads_only_metrics_the_relay_exposes(
    chart: helm_python.Chart, module_relay: RelayProcess
) -> None:
    exposed = exposed_series(httpx.get(f"{module_relay.base_url}/metrics", timeout=10).text)
    board = dashboard(chart)
    for expr in queries(board) + variable_queries(board):
        names = metric_names(expr)
        assert names, f"no metric found in {expr}"
        assert names <= exposed, f"{sorted(names - exposed)} not on /metrics: {expr}"


def test_relay_exposes_its_readiness_as_a_gauge(module_relay: RelayProcess) -> None:
    assert httpx.get(f"{module_relay.base_url}/readyz", timeout=10).status_code == 200
    metrics = httpx.get(f"{module_relay.base_url}/metrics", timeout=10).text
    assert re.search(r"^emailrelay_ready 1\.0$", metrics, re.MULTILINE), metrics


def test_readiness_gauge_reads_zero_while_not_ready() -> None:
    health_app(is_ready=lambda: False)
    assert re.search(rb"^emailrelay_ready 0\.0$", generate_latest(), re.MULTILINE)
