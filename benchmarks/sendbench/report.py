"""The figures of a run and the tables they are printed as (pure: no I/O)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Scenario:
    """One cell of the matrix. ``pool`` 0 means SMTP_POOL_SIZE unset (the relay's default)."""

    latency_ms: int
    concurrency: int
    processes: int = 1
    pool: int = 0
    events: bool = False
    """EVENTS_STREAM_ENABLED=true: each send also publishes its ``sent`` event."""
    transport: str = "smtp"
    """EMAIL_TRANSPORT: ``smtp`` (the SMTP sink) or ``ses`` (a local SES v2 endpoint)."""

    def label(self, default_pool: int) -> str:
        pool = f"{self.pool}" if self.pool else f"{default_pool} (default)"
        label = f"{self.latency_ms} ms  C={self.concurrency}  P={self.processes}  pool={pool}"
        label = label if self.transport == "smtp" else f"{label}  {self.transport}"
        return label + ("  events" if self.events else "")


@dataclass
class Ceiling:
    """One part alone: operations per second, and its CPU per operation."""

    kind: str  # "responder", "smtp", "kv"
    params: str
    rate: float
    p50: float
    p99: float
    cpu_ms: float


@dataclass
class Result:
    scenario: Scenario
    successes: int
    seconds: float
    latencies: Sequence[float]
    errors: Mapping[str, int]
    relay_cpu_ms: float  # per success, all relay processes together
    sink_cpu_ms: float  # per message the sink received
    nats_cpu_ms: float  # per success
    peak_rss_mb: Sequence[float]  # one per relay process
    ready_seconds: Sequence[float]  # one per relay process
    verification: str = ""
    verified: bool = False
    ceilings: Mapping[str, float] = field(default_factory=dict)  # kind -> ops/s
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.successes / self.seconds if self.seconds else 0.0

    @property
    def tightest(self) -> tuple[str, float] | None:
        if not self.ceilings:
            return None
        return min(self.ceilings.items(), key=lambda item: item[1])


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def _each(values: Sequence[float], fmt: str) -> str:
    return "/".join(format(value, fmt) for value in values) or "-"


def format_results(results: Sequence[Result], default_pool: int) -> str:
    headers = (
        "scenario",
        "sends/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "relay ms/send",
        "sink ms/msg",
        "nats ms/send",
        "peak RSS MB",
        "ready s",
        "tightest ceiling",
        "of ceiling",
        "verified",
    )
    rows = []
    for result in results:
        tightest = result.tightest
        rows.append(
            (
                result.scenario.label(default_pool),
                f"{result.rate:.0f}",
                _ms(percentile(result.latencies, 0.5)),
                _ms(percentile(result.latencies, 0.9)),
                _ms(percentile(result.latencies, 0.99)),
                str(sum(result.errors.values())),
                f"{result.relay_cpu_ms:.2f}",
                f"{result.sink_cpu_ms:.2f}",
                f"{result.nats_cpu_ms:.2f}",
                _each(result.peak_rss_mb, ".0f"),
                _each(result.ready_seconds, ".2f"),
                f"{tightest[0]} {tightest[1]:.0f}/s" if tightest else "-",
                f"{result.rate / tightest[1]:.0%}" if tightest and tightest[1] else "-",
                "yes" if result.verified else "NO",
            )
        )
    return _table(headers, rows)


def format_ceilings(ceilings: Sequence[Ceiling]) -> str:
    headers = ("ceiling", "at", "ops/s", "p50 ms", "p99 ms", "CPU ms/op")
    rows = [
        (c.kind, c.params, f"{c.rate:.0f}", _ms(c.p50), _ms(c.p99), f"{c.cpu_ms:.2f}")
        for c in ceilings
    ]
    return _table(headers, rows)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])
