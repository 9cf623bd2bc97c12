"""The Helm chart rendered and linted offline by the real Helm engine
(``helm-python-sdk`` binds Helm's Go SDK: the same code paths as ``helm
template`` and ``helm lint``), for the chart's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

try:
    import helm_python
except ImportError as exc:  # a declared test dependency: never skip
    raise ImportError(
        "helm-python-sdk is a test dependency of emailrelay (pip install -e '.[test]'); "
        "the chart tests cannot run without it"
    ) from exc

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "emailrelay"
RELEASE = "mail"
NAMESPACE = "lfx"
FULLNAME = "mail-emailrelay"


def render(chart: helm_python.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All Kubernetes objects the chart renders (NOTES.txt excluded)."""
    manifests = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def lint_problems(report: dict[str, Any]) -> list[Any]:
    """Errors and warnings of a lint report (info findings such as 'icon is recommended' pass)."""
    return report["errors"] + [m for m in report["messages"] if m["severity"] >= 2]
