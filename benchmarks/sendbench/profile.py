"""A text summary of a py-spy profile in collapsed-stack form (``--format raw``).

Each line of the file is ``frame;frame;...;leaf count``, a frame being
``function (file:line)``. The summary gives each area's share of samples
(inclusive: a sample counts for an area when any frame of its stack is in it)
and the functions where samples end (self time).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Inclusive areas, checked against every frame's file; first match per area.
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MIME building (stdlib email)", ("/email/",)),
    ("emailrelay.mail", ("emailrelay/mail/",)),
    ("aiosmtplib", ("aiosmtplib/",)),
    ("nats-py", ("/nats/",)),
    ("trio-asyncio", ("trio_asyncio/",)),
    ("asyncio", ("/asyncio/",)),
    ("trio", ("/trio/",)),
    ("json", ("/json/",)),
    ("pydantic", ("pydantic",)),
    ("logging", ("/logging/", "emailrelay/logs.py")),
    ("prometheus_client", ("prometheus_client/",)),
    ("emailrelay.store", ("emailrelay/store/",)),
    ("emailrelay.handlers", ("emailrelay/handlers/",)),
)


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


def summarize(lines: Iterable[str], top: int = 15) -> str:
    stacks = parse(lines)
    total = sum(count for _, count in stacks)
    if not total:
        return "no samples"
    areas: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for frames, count in stacks:
        leaves[frames[-1]] += count
        for area, needles in AREAS:
            if any(needle in frame for frame in frames for needle in needles):
                areas[area] += count
    out = [f"{total} samples; share of samples whose stack passes through:"]
    out += [f"  {share / total:6.1%}  {area}" for area, share in areas.most_common()]
    out.append("where samples end (self time):")
    out += [f"  {share / total:6.1%}  {leaf}" for leaf, share in leaves.most_common(top)]
    return "\n".join(out)
