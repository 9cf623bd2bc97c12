"""The docs match the code: every chart setting has its row in
docs/deployment.md, and every subject and header of the contract has its
place in docs/contract.md. Both lists come from the code (the chart's values
and template, ``emailrelay.api``), so what later changes add is checked too."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from emailrelay import api

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "emailrelay"
DEPLOYMENT = (REPO / "docs" / "deployment.md").read_text(encoding="utf-8")
CONTRACT = (REPO / "docs" / "contract.md").read_text(encoding="utf-8")


def config_leaves() -> dict[str, Any]:
    """Every leaf under ``config`` in values.yaml, by full dotted path."""
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    leaves: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}", value)
        else:
            leaves[prefix] = node

    walk("config", values["config"])
    return leaves


def variables_by_path() -> dict[str, str]:
    """The environment variable the chart renders from each ``config`` path
    (the ``emailrelay.configEnv`` pairs of templates/_helpers.tpl)."""
    template = (CHART / "templates" / "_helpers.tpl").read_text(encoding="utf-8")
    sections = dict(re.findall(r"\$(\w+) := \$c\.(\w+) \| default dict", template))
    sections["c"] = ""
    found = {}
    for name, section, key in re.findall(r'\(list "([A-Z0-9_]+)" \$(\w+)\.(\w+)\)', template):
        path = ".".join(part for part in ("config", sections[section], key) if part)
        found[path] = name
    return found


def table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def shown_default(value: Any) -> str:
    """How a row writes a default: `false`, `587`, `""`, or unset for null."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


LEAVES = config_leaves()


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_every_chart_setting_has_a_deployment_row_with_its_variable_and_default(
    path: str,
) -> None:
    variable = variables_by_path().get(path)
    assert variable is not None, f"the chart renders no variable from {path}"
    rows = [row for row in table_rows(DEPLOYMENT) if row.startswith(f"| `{path}` |")]
    assert rows, f"docs/deployment.md has no table row for `{path}`"
    [row] = rows
    assert f"`{variable}`" in row
    assert shown_default(LEAVES[path]) in row


def contract_names(suffix: str) -> dict[str, str]:
    """``emailrelay.api`` constants named ``*<suffix>``: the contract's own list."""
    return {
        name: value
        for name, value in vars(api).items()
        if name.endswith(suffix) and isinstance(value, str)
    }


def served_subjects() -> set[str]:
    subjects = set(contract_names("_SUBJECT").values())
    for name, value in vars(api).items():
        if name.endswith("_SUBJECTS"):
            # A tuple of subjects, or one wildcard such as the events stream's.
            subjects.update([value] if isinstance(value, str) else value)
    return subjects


@pytest.mark.parametrize("subject", sorted(served_subjects()))
def test_every_subject_is_in_the_contract(subject: str) -> None:
    assert f"`{subject}`" in CONTRACT


@pytest.mark.parametrize("header", sorted(contract_names("_HEADER").values()))
def test_every_header_is_in_the_contract(header: str) -> None:
    assert f"`{header}" in CONTRACT
