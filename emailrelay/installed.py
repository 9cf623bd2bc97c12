"""Whether this install holds an extra's dependencies, asked before importing them.

``pip install emailrelay`` is the client alone (see pyproject.toml); ``serve``
and ``dev`` need ``emailrelay[server]`` or ``emailrelay[dev]``. Without this
check they would die on the first missing import with a traceback that does
not say what to install. The extras are read from the installed metadata, so
this list cannot drift from pyproject.toml. Standard library only: it runs in
the lean install.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution, requires

_PROJECT = "emailrelay"
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?[^;]*(?:;(.*))?$")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_for(extra: str) -> list[str]:
    """The distributions ``emailrelay[extra]`` brings that are not installed,
    sorted; empty when all are there, or when emailrelay itself is not an
    installed distribution (a bare source tree: the imports then decide)."""
    try:
        requirements = requires(_PROJECT) or []
    except PackageNotFoundError:
        return []
    missing: set[str] = set()
    seen: set[str] = set()
    wanted = [extra]
    while wanted:
        current = wanted.pop()
        if current in seen:
            continue
        seen.add(current)
        for line in requirements:
            parsed = _REQUIREMENT.match(line)
            if parsed is None:
                continue
            name, extras, marker = parsed.groups()
            if marker is None or current not in _EXTRA_MARKER.findall(marker):
                continue
            if _normalized(name) == _PROJECT:  # e.g. server = ["emailrelay[trio]", ...]
                wanted.extend(part.strip() for part in (extras or "").split(",") if part.strip())
                continue
            try:
                distribution(name)
            except PackageNotFoundError:
                missing.add(_normalized(name))
    return sorted(missing)


def install_hint(command: str, extra: str) -> str | None:
    """One line saying what to install for ``emailrelay COMMAND``, or None when
    nothing is missing."""
    missing = missing_for(extra)
    if not missing:
        return None
    return (
        f"emailrelay: `{command}` needs what this install leaves out "
        f"({', '.join(missing)}): pip install '{_PROJECT}[{extra}]'"
    )
