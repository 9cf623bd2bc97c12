"""Sends per second through real ``emailrelay serve`` processes, with ceilings from the same run.

Starts its own nats-server (JetStream in a temp dir), an SMTP sink with
per-message latency in a process of its own (aiosmtpd), 1 or 3 relays
(tracking on, buckets auto-created, ``EMAIL_ENABLED=true``,
``SMTP_TLS_MODE=none``), and drives them from a separate load-generator
process (plain nats-py on asyncio: N requests, C in flight, one group per
run). The relay is touched only through its public surface: NATS requests,
environment variables, ``/readyz`` and ``/metrics``.

The ``ses`` rows run the relay with ``EMAIL_TRANSPORT=ses`` against a local
SES v2 endpoint in a process of its own (``sendbench/ses_sink.py``, the same
latencies), so the two transports' CPU per send sit side by side.

After each run it checks that every success reached the SMTP server (by
``X-LFX-TRACKING-ID``), has its record and is in its group's index exactly
once. CPU per send comes from ``/proc/<pid>/stat`` deltas over the measured
phase (warm-up excluded); peak RSS from ``VmHWM``.

Rows marked ``events`` run with ``EVENTS_STREAM_ENABLED=true`` beside the same
scenario without it: the cost of publishing each ``sent`` event to EMAIL_EVENTS
(and each is checked to be in the stream once).

Ceilings, each measured in the same run at the same concurrency:
``responder`` (a trivial NATS responder behind the relay's trio-asyncio
hand-off), ``smtp`` (the relay's SMTP pool alone against the same sink, same
latency and pool size), ``kv`` (a record create plus a group-index append).
Every figure is printed beside the tightest of them. Ceilings are for one
process; a 3-process row is compared with them as they are.

Figures only: nothing asserts timing. Exit status 1 when a delivery check fails.

    python benchmarks/bench_send.py                 # the whole matrix (3-5 min on 2 quiet cores)
    python benchmarks/bench_send.py --quick         # smoke run: one tiny scenario
    python benchmarks/bench_send.py --latency 0 --concurrency 64 --processes 1 --n 3000
    python benchmarks/bench_send.py --latency 0 --concurrency 64 --py-spy /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sendbench import profile, verify
from benchmarks.sendbench.procs import (
    Child,
    NatsServer,
    Relay,
    cpu_seconds,
    free_port,
    metric_total,
    peak_rss_mb,
    wait_ready,
)
from benchmarks.sendbench.report import (
    Ceiling,
    Result,
    Scenario,
    format_ceilings,
    format_results,
    percentile,
)
from emailrelay.dev.sesapi import dev_ses_environment

SEND_SUBJECT = "lfx.email-service.send_email"

MATRIX = (
    Scenario(0, 1),
    Scenario(0, 64),
    Scenario(0, 64, events=True),
    Scenario(0, 256),
    Scenario(0, 256, processes=3),
    Scenario(50, 1),
    Scenario(50, 64),
    Scenario(50, 64, events=True),
    Scenario(50, 64, pool=64),
    Scenario(50, 256),
    Scenario(50, 256, pool=256),
    Scenario(50, 256, processes=3),
    Scenario(50, 256, processes=3, pool=256),
    # EMAIL_TRANSPORT=ses against a local SES v2 endpoint (same latencies).
    Scenario(0, 64, transport="ses"),
    Scenario(50, 64, transport="ses"),
    Scenario(50, 256, pool=256, transport="ses"),
)
QUICK = (Scenario(0, 8),)


@dataclass
class Load:
    """What the load generator reports for its measured phase."""

    seconds: float
    latencies: list[float]
    ids: list[str]
    errors: dict[str, int]

    @classmethod
    def from_line(cls, line: str) -> Load:
        data = json.loads(line)
        return cls(
            seconds=float(data["seconds"]),
            latencies=[float(x) for x in data["latencies"]],
            ids=[str(x) for x in data["ids"]],
            errors={str(k): int(v) for k, v in data["errors"].items()},
        )


def relay_default_pool_size() -> int:
    """SMTP_POOL_SIZE when unset, as the relay reads it (16 when this was written)."""
    try:
        from emailrelay.config import load_settings

        return int(load_settings({}).smtp_pool_size)
    except Exception:
        return 16


class Sink:
    """The sink process (SMTP, or a local SES v2 endpoint for ``transport``
    ses) and the file it logs each message's tracking id to."""

    def __init__(self, latency_ms: int, directory: Path, transport: str = "smtp") -> None:
        self.port = free_port()
        self.ids_path = directory / f"sink-{transport}-{latency_ms}ms.ids"
        self.ids_path.touch()
        self.child = Child.module(
            "sink" if transport == "smtp" else "ses_sink",
            "--port",
            str(self.port),
            "--latency",
            str(latency_ms / 1000),
            "--ids",
            str(self.ids_path),
        )
        self.child.expect("ready", timeout=30)

    @property
    def pid(self) -> int:
        return self.child.pid

    def values(self) -> list[str]:
        return self.ids_path.read_text().splitlines()

    def count(self) -> int:
        return len(self.values())

    def stop(self) -> None:
        self.child.stop()


@dataclass
class Bench:
    nats: NatsServer
    work_dir: Path
    n: int
    n_serial: int
    warmup_cap: int
    default_pool: int
    ceilings_on: bool
    py_spy: Path | None
    sinks: dict[tuple[int, str], Sink] = field(default_factory=dict)
    ceilings: dict[tuple[object, ...], Ceiling] = field(default_factory=dict)
    failed_ceilings: dict[tuple[object, ...], str] = field(default_factory=dict)

    def requests_for(self, concurrency: int) -> int:
        return self.n_serial if concurrency == 1 else self.n

    def warmup_for(self, concurrency: int) -> int:
        return min(max(2 * concurrency, 10), self.warmup_cap)

    def sink(self, latency_ms: int, transport: str = "smtp") -> Sink:
        if (latency_ms, transport) not in self.sinks:
            self.sinks[latency_ms, transport] = Sink(latency_ms, self.work_dir, transport)
        return self.sinks[latency_ms, transport]

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.stop()

    # --- ceilings --------------------------------------------------------

    def ceilings_for(self, scenario: Scenario) -> dict[str, float]:
        if not self.ceilings_on:
            return {}
        c, pool = scenario.concurrency, scenario.pool or self.default_pool
        found = {
            "responder": self._ceiling(("responder", c), lambda: self._responder(c)),
            "kv": self._ceiling(("kv", c), lambda: self._kv(c)),
        }
        if scenario.transport == "smtp":  # the SMTP pool alone; no SES counterpart
            found["smtp"] = self._ceiling(
                ("smtp", scenario.latency_ms, c, pool),
                lambda: self._smtp(scenario.latency_ms, c, pool),
            )
        return {kind: ceiling.rate for kind, ceiling in found.items() if ceiling is not None}

    def _ceiling(self, key: tuple[object, ...], measure: Callable[[], Ceiling]) -> Ceiling | None:
        """Measured once per key. A ceiling drives the relay's internals
        (bridge, pool, store), which other work may reshape: when one fails,
        say so loudly, carry on with the others, and exit non-zero at the end."""
        if key in self.ceilings:
            return self.ceilings[key]
        if key in self.failed_ceilings:
            return None
        try:
            ceiling = self.ceilings[key] = measure()
        except Exception as exc:
            self.failed_ceilings[key] = f"{exc.__class__.__name__}: {exc}"
            print(f"  CEILING FAILED {key}: {self.failed_ceilings[key]}", flush=True)
            return None
        print(f"  ceiling {ceiling.kind} {ceiling.params}: {ceiling.rate:.0f}/s", flush=True)
        return ceiling

    def _responder(self, c: int) -> Ceiling:
        subject = f"bench.ceiling.responder.{uuid.uuid4().hex}"
        n = 5 * self.n_serial if c == 1 else 2 * self.n
        responder = Child.module(
            "ceilings", "responder", "--url", self.nats.url, "--subject", subject
        )
        try:
            responder.expect("ready", timeout=60)
            outcome, cpu = self._drive(
                "ping", subject, n, c, self.warmup_for(c), "", [responder.pid]
            )
        finally:
            responder.stop()
        latencies = outcome.latencies
        return Ceiling(
            "responder",
            f"C={c}",
            len(outcome.ids) / outcome.seconds,
            percentile(latencies, 0.5),
            percentile(latencies, 0.99),
            cpu[0] / n * 1000,
        )

    def _smtp(self, latency_ms: int, c: int, pool: int) -> Ceiling:
        n = self.requests_for(c)
        sink = self.sink(latency_ms)
        child = Child.module(
            "ceilings",
            "smtp",
            "--smtp-port",
            str(sink.port),
            "--pool-size",
            str(pool),
            "--n",
            str(n),
            "--c",
            str(c),
        )
        try:
            result = json.loads(child.line(timeout=600))
        finally:
            child.stop()
        return _self_driven("smtp", f"{latency_ms} ms C={c} pool={pool}", n, result)

    def _kv(self, c: int) -> Ceiling:
        n = self.requests_for(c)
        child = Child.module("ceilings", "kv", "--url", self.nats.url, "--n", str(n), "--c", str(c))
        try:
            result = json.loads(child.line(timeout=600))
        finally:
            child.stop()
        return _self_driven("kv", f"C={c}", n, result)

    # --- the relay -------------------------------------------------------

    def _drive(
        self,
        kind: str,
        subject: str,
        n: int,
        c: int,
        warmup: int,
        group: str,
        measured_pids: Sequence[int],
        profile_pid: int | None = None,
        profile_name: str = "",
    ) -> tuple[Load, list[float]]:
        """Run the load generator; CPU seconds of ``measured_pids`` over the measured phase."""
        args = ["--url", self.nats.url, "--subject", subject, "--kind", kind]
        args += ["--n", str(n), "--c", str(c), "--warmup", str(warmup)]
        args += [f"--group={group or 'none'}", f"--warmup-group={group or 'none'}-warmup"]
        loadgen = Child.module("loadgen", *args, stdin=True)
        spies: list[subprocess.Popen[bytes]] = []
        try:
            loadgen.expect("ready", timeout=600)
            before = [cpu_seconds(pid) for pid in measured_pids]
            if profile_pid is not None and self.py_spy is not None:
                spies = _start_py_spy(profile_pid, self.py_spy / profile_name)
            loadgen.tell("go")
            outcome = Load.from_line(loadgen.line(timeout=1800))
            after = [cpu_seconds(pid) for pid in measured_pids]
        finally:
            for spy in spies:
                _stop_py_spy(spy)
            loadgen.stop()
        return outcome, [b - a for a, b in zip(before, after, strict=True)]

    def run(self, scenario: Scenario) -> Result:
        ceilings = self.ceilings_for(scenario)
        sink = self.sink(scenario.latency_ms, scenario.transport)
        env = {
            "NATS_URL": self.nats.url,
            "EMAIL_ENABLED": "true",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(sink.port),
            "SMTP_TLS_MODE": "none",
        }
        if scenario.transport == "ses":
            env.update(dev_ses_environment(f"http://127.0.0.1:{sink.port}"))
        if scenario.pool:
            env["SMTP_POOL_SIZE"] = str(scenario.pool)
        if scenario.events:
            env["EVENTS_STREAM_ENABLED"] = "true"
        c, n = scenario.concurrency, self.requests_for(scenario.concurrency)
        group = f"bench-{uuid.uuid4()}"
        pool = scenario.pool or "default"
        label = f"{scenario.latency_ms}ms-c{c}-p{scenario.processes}-pool{pool}"
        if scenario.transport != "smtp":
            label += f"-{scenario.transport}"
        relays: list[Relay] = []
        try:
            # One after another, so each start-to-ready time is one process's own.
            for _ in range(scenario.processes):
                relays.append(Relay.start(env, self.work_dir))
                wait_ready(relays[-1:])
            pids = [relay.pid for relay in relays] + [sink.pid, self.nats.pid]
            sink_before = sink.count()
            outcome, cpu = self._drive(
                "send",
                SEND_SUBJECT,
                n,
                c,
                self.warmup_for(c),
                group,
                pids,
                profile_pid=relays[0].pid if scenario.processes == 1 else None,
                profile_name=label,
            )
            sink_messages = sink.count() - sink_before
            # A reply waits for tracking at most TRACKING_WAIT; what was not
            # stored by then follows it from the pending writes. Check once
            # they are empty, and say how long that took.
            pending_drained = wait_pending_drained(relays)
            rss = [peak_rss_mb(relay.pid) for relay in relays]
            metrics = [relay.metrics() for relay in relays]
            ids = outcome.ids
            checked = asyncio.run(verify.collect(self.nats.url, group, ids, sink.values()))
            events = (
                asyncio.run(verify.sent_events(self.nats.url, ids)) if scenario.events else None
            )
        finally:
            exits = [relay.stop() for relay in relays]
        successes = len(ids)
        relay_cpu = sum(cpu[: scenario.processes])
        sink_cpu, nats_cpu = cpu[scenario.processes :]
        result = Result(
            scenario=scenario,
            successes=successes,
            seconds=outcome.seconds,
            latencies=outcome.latencies,
            errors=outcome.errors,
            relay_cpu_ms=relay_cpu / successes * 1000 if successes else float("nan"),
            sink_cpu_ms=sink_cpu / sink_messages * 1000 if sink_messages else float("nan"),
            nats_cpu_ms=nats_cpu / successes * 1000 if successes else float("nan"),
            peak_rss_mb=rss,
            ready_seconds=[relay.ready_seconds for relay in relays],
            verification=checked.summary(),
            verified=checked.ok and successes > 0 and _events_ok(events, ids),
            ceilings=ceilings,
        )
        result.notes.append(checked.summary())
        if events is not None:
            once = sum(1 for i in ids if events[i] == 1)
            result.notes.append(f"{once} of {successes} with one sent event in EMAIL_EVENTS")
        if checked.index_total is not None and checked.index_total != successes:
            result.notes.append(f"group index holds {checked.index_total} ids")
        if result.errors:
            result.notes.append(f"errors: {dict(result.errors)}")
        result.notes.append(_metrics_note(metrics))
        if any(code != 0 for code in exits):
            result.notes.append(f"relay exit codes {exits}")
        if pending_drained is None:
            result.notes.append(f"tracking writes still pending after {PENDING_DRAIN_WAIT:.0f} s")
        elif pending_drained > 0:
            result.notes.append(
                f"pending tracking writes stored {pending_drained:.1f} s after the load"
            )
        return result


PENDING_DRAIN_WAIT = 60.0


def wait_pending_drained(relays: Sequence[Relay]) -> float | None:
    """Seconds until no relay holds a pending tracking write (0.0: none was
    pending); ``None`` when some still are after :data:`PENDING_DRAIN_WAIT`."""
    started = time.monotonic()
    while True:
        pending = sum(
            metric_total(relay.metrics(), "emailrelay_tracking_pending") for relay in relays
        )
        waited = time.monotonic() - started
        if pending == 0:
            return waited if waited >= 0.05 else 0.0
        if waited >= PENDING_DRAIN_WAIT:
            return None
        time.sleep(0.1)


def _events_ok(events: Counter[str] | None, ids: Sequence[str]) -> bool:
    """With the events stream on, every success has exactly one ``sent`` event."""
    return events is None or all(events[i] == 1 for i in ids)


def _self_driven(kind: str, params: str, n: int, result: dict[str, object]) -> Ceiling:
    latencies = result["latencies"]
    assert isinstance(latencies, list)
    seconds, cpu = float(result["seconds"]), float(result["cpu"])  # type: ignore[arg-type]
    return Ceiling(
        kind,
        params,
        n / seconds,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        cpu / n * 1000,
    )


def _metrics_note(metrics: Sequence[str]) -> str:
    conflicts = sum(metric_total(text, "emailrelay_kv_conflicts_total") for text in metrics)
    failures = sum(
        metric_total(text, "emailrelay_tracking_write_failures_total") for text in metrics
    )
    connections = [metric_total(text, "emailrelay_smtp_connections") for text in metrics]
    return (
        f"/metrics: kv conflicts {conflicts:.0f}, tracking write failures {failures:.0f}, "
        f"SMTP connections open at the end {'/'.join(f'{c:.0f}' for c in connections)}"
    )


def _start_py_spy(pid: int, output: Path) -> list[subprocess.Popen[bytes]]:
    """Two samplers on one process: collapsed stacks (``.txt``, summarized at
    the end) and a flame graph (``.svg``). Non-blocking: the relay is never paused."""
    output.parent.mkdir(parents=True, exist_ok=True)
    spy_bin = Path(sys.executable).with_name("py-spy")
    command = [str(spy_bin) if spy_bin.exists() else "py-spy", "record", "--pid", str(pid)]
    command += ["--nonblocking", "--rate", "100"]
    return [
        subprocess.Popen(
            [*command, "--format", fmt, "--output", str(output.with_suffix(suffix))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fmt, suffix in (("raw", ".txt"), ("flamegraph", ".svg"))
    ]


def _stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({model or platform.machine()}), Python "
        f"{platform.python_version()}, load average {load}"
    )


def select(args: argparse.Namespace) -> list[Scenario]:
    if args.quick:
        return list(QUICK)

    def wanted(value: int, allowed: str | None) -> bool:
        return allowed is None or str(value) in allowed.split(",")

    pools = None if args.pool is None else set(args.pool.split(","))
    chosen = [
        s
        for s in MATRIX
        if wanted(s.latency_ms, args.latency)
        and wanted(s.concurrency, args.concurrency)
        and wanted(s.processes, args.processes)
        and (pools is None or ("default" if not s.pool else "large") in pools)
        and (args.transport is None or s.transport in args.transport.split(","))
    ]
    return chosen


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one tiny scenario (smoke run)")
    parser.add_argument("--n", type=int, help="requests per run at C>1 (default 3000)")
    parser.add_argument("--n-serial", type=int, help="requests per run at C=1 (default 100)")
    parser.add_argument("--latency", help="SMTP latencies in ms to run, e.g. 0,50")
    parser.add_argument("--concurrency", help="requests in flight to run, e.g. 1,64,256")
    parser.add_argument("--processes", help="relay process counts to run, e.g. 1,3")
    parser.add_argument("--pool", help="default, large (SMTP_POOL_SIZE = C), or both")
    parser.add_argument("--transport", help="smtp, ses (a local SES v2 endpoint), or both")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the ceilings")
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="profile each single-process relay's measured phase with py-spy "
        "(collapsed stacks in DIR, a summary printed)",
    )
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 40 if args.quick else 3000
    if args.n_serial is None:
        args.n_serial = 20 if args.quick else 100
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = select(args)
    if not scenarios:
        print("no scenario matches the filters", file=sys.stderr)
        return 2
    default_pool = relay_default_pool_size()
    print(f"bench_send: {machine()}", flush=True)
    print(
        f"  {len(scenarios)} scenarios, N={args.n} (C>1) / {args.n_serial} (C=1); "
        f"relay default SMTP_POOL_SIZE={default_pool}",
        flush=True,
    )
    started = time.monotonic()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-send-") as work:
        nats = NatsServer()
        bench = Bench(
            nats=nats,
            work_dir=Path(work),
            n=args.n,
            n_serial=args.n_serial,
            warmup_cap=8 if args.quick else 400,
            default_pool=default_pool,
            ceilings_on=not args.no_ceilings,
            py_spy=args.py_spy,
        )
        try:
            for scenario in scenarios:
                result = bench.run(scenario)
                results.append(result)
                print(
                    f"{scenario.label(default_pool)}: {result.rate:.0f} sends/s; "
                    + "; ".join(result.notes),
                    flush=True,
                )
        finally:
            bench.close()
            nats.close()
    if bench.ceilings:
        print()
        print(f"ceilings (one process each, same run; {machine()}):")
        print(format_ceilings(list(bench.ceilings.values())))
    print()
    print(f"sends (whole run {time.monotonic() - started:.0f}s):")
    print(format_results(results, default_pool))
    if args.py_spy is not None:
        for path in sorted(args.py_spy.glob("*.txt")):
            print(f"\npy-spy profile {path}:")
            print(profile.summarize(path.read_text().splitlines()))
    failed = [r for r in results if not r.verified]
    for result in failed:
        label = result.scenario.label(default_pool)
        print(f"DELIVERY CHECK FAILED: {label}: {result.verification}")
    for key, reason in bench.failed_ceilings.items():
        print(f"CEILING FAILED {key}: {reason}")
    return 1 if failed or bench.failed_ceilings else 0


if __name__ == "__main__":
    sys.exit(main())
