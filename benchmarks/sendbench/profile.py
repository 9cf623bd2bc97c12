"""A text summary of a py-spy profile in collapsed-stack form (``--format raw``).

Each line of the file is ``frame;frame;...;leaf count``, a frame being
``function (file:line)``. The summary gives each area's share of samples
(inclusive: a sample counts for an area when any frame of its stack is in it)
and the functions where samples end (self time).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Inclusive areas by source file. py-spy names files relative to their
# sys.path entry ("email/headerregistry.py", "trio/_core/_run.py"), or in full
# where it cannot; a prefix matches either way.
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MIME building (stdlib email)", ("email/",)),
    ("emailrelay.mail", ("emailrelay/mail/",)),
    ("emailrelay.handlers", ("emailrelay/handlers/",)),
    ("emailrelay.server", ("emailrelay/server.py",)),
    ("emailrelay.store", ("emailrelay/store/",)),
    ("emailrelay.bridge", ("emailrelay/bridge/",)),
    ("aiosmtplib", ("aiosmtplib/",)),
    ("nats-py", ("nats/",)),
    ("trio-asyncio", ("trio_asyncio/",)),
    ("asyncio", ("asyncio/",)),
    ("trio", ("trio/",)),
    ("json", ("json/",)),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("logging", ("logging/", "emailrelay/logs.py")),
    ("prometheus_client", ("prometheus_client/",)),
    ("opentelemetry / tracing", ("opentelemetry/", "emailrelay/tracing.py")),
)
IDLE_LEAVES = ("get_events (", ".select (", ".poll (")
"""Leaf frames that are a loop waiting in epoll (py-spy's idle detection misses some)."""
SOCKET_WRITE = "_SelectorSocketTransport.write ("
ROOTS = frozenset({"trio", "trio-asyncio", "asyncio"})
"""Areas at the root of nearly every stack: left out of the inclusive view."""


def _file(frame: str) -> str:
    return frame[frame.rfind("(") + 1 : frame.rfind(":")]


def _in_area(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path.startswith(p) or f"/{p}" in path for p in prefixes)


def parse(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    stacks = []
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            stacks.append((stack.split(";"), int(count)))
        except ValueError:
            continue
    return stacks


def _area_of(path: str) -> str:
    for area, prefixes in AREAS:
        if _in_area(path, prefixes):
            return area
    return "other: " + path.split("/", 1)[0]


def summarize(lines: Iterable[str], top: int = 15) -> str:
    """Three views: by area inclusive (the loops at the root of every stack
    left out), by area of the leaf frame (self time), and the top leaf frames."""
    stacks = parse(lines)
    total = sum(count for _, count in stacks)
    if not total:
        return "no samples"
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for frames, count in stacks:
        leaves[frames[-1]] += count
        if any(idle in frames[-1] for idle in IDLE_LEAVES):
            own["waiting in epoll (idle)"] += count
        elif frames[-1].startswith(SOCKET_WRITE):
            own["socket writes (asyncio transport.write: the send syscall)"] += count
        else:
            own[_area_of(_file(frames[-1]))] += count
        files = [_file(frame) for frame in frames]
        for area, prefixes in AREAS:
            if area not in ROOTS and any(_in_area(path, prefixes) for path in files):
                inclusive[area] += count

    def shares(counter: Counter[str], limit: int | None = None) -> list[str]:
        return [f"  {n / total:6.1%}  {name}" for name, n in counter.most_common(limit)]

    return "\n".join(
        [
            f"{total} samples. Share of samples whose stack passes through:",
            *shares(inclusive),
            "Self time (the frame a sample ends in), by area:",
            *shares(own, top),
            "Self time, top frames:",
            *shares(leaves, top),
        ]
    )
