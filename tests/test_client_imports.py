"""The client path imports only what ``pip install emailrelay`` (no extras)
installs: fast, in-process proof of the rule that ``nox -s packaging`` proves
with a real lean virtualenv.

The client path is ``emailrelay``, ``emailrelay.api``, ``emailrelay.client``
and the ``emailrelay`` command up to its parser (``send``, ``status`` and
``analytics`` work in the lean install; ``serve`` and ``dev`` check for their
extra before importing anything of theirs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires

import pytest

# Only what these imports add: site's own (a setuptools .pth hook) is no client's.
CLIENT_PATH = """
import json, sys
before = set(sys.modules)
import emailrelay, emailrelay.api, emailrelay.client, emailrelay.cli
emailrelay.cli.build_parser()
print(json.dumps(sorted({name.split(".")[0] for name in set(sys.modules) - before})))
"""


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _core_closure() -> set[str]:
    """emailrelay and every distribution its install without extras pulls in."""
    found: set[str] = set()
    wanted = ["emailrelay"]
    while wanted:
        name = _normalized(wanted.pop())
        if name in found:
            continue
        found.add(name)
        try:
            lines = requires(name) or []
        except PackageNotFoundError:  # excluded by its marker here (exceptiongroup on 3.11+)
            continue
        for line in lines:
            requirement, _, marker = line.partition(";")
            if "extra" not in marker:
                wanted.append(re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0])
    return found


@pytest.fixture(scope="module")
def client_path_modules() -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_PATH], capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout))


def test_client_path_imports_nothing_outside_the_lean_install(
    client_path_modules: set[str],
) -> None:
    owners = packages_distributions()
    allowed = _core_closure()
    outside = {
        module: owners[module]
        for module in client_path_modules - set(sys.stdlib_module_names)
        if module in owners and not {_normalized(d) for d in owners[module]} & allowed
    }
    assert outside == {}
