"""The send benchmark's harness (benchmarks/bench_send.py): a quick real run,
and its checks and tables over made-up figures. Nothing here asserts timing."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from benchmarks import bench_send
from benchmarks.sendbench.procs import metric_total
from benchmarks.sendbench.profile import summarize
from benchmarks.sendbench.report import Ceiling, Result, Scenario, format_results, percentile
from benchmarks.sendbench.sink import tracking_value
from benchmarks.sendbench.verify import check_deliveries, email_id_of

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_send.py"


def test_quick_run_prints_the_table_and_verifies_every_delivery() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--n", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 20 delivered, recorded and indexed" in done.stdout
    lines = done.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("scenario"))
    header, row = lines[at], lines[at + 2]
    assert "sends/s" in header
    assert "relay ms/send" in header
    assert "tightest ceiling" in header
    assert row.rstrip().endswith("yes")


IDS = ["a1", "b2", "c3"]


def test_every_success_delivered_recorded_and_indexed_is_ok() -> None:
    checked = check_deliveries(IDS, ["g/a1", "g/b2", "g/c3"], IDS, IDS, index_total=3)
    assert checked.ok
    assert checked.summary() == "all 3 delivered, recorded and indexed"


def test_a_success_that_never_reached_the_smtp_server_is_reported() -> None:
    checked = check_deliveries(IDS, ["g/a1", "g/c3"], IDS, IDS)
    assert not checked.ok
    assert checked.missing_at_sink == ["b2"]


def test_a_success_without_a_record_is_reported() -> None:
    checked = check_deliveries(IDS, ["g/a1", "g/b2", "g/c3"], ["a1", "b2"], IDS)
    assert not checked.ok
    assert checked.missing_record == ["c3"]


def test_a_success_missing_from_the_group_index_is_reported() -> None:
    checked = check_deliveries(IDS, ["g/a1", "g/b2", "g/c3"], IDS, ["a1", "c3"])
    assert not checked.ok
    assert checked.missing_from_index == ["b2"]
    assert "1 missing from the group index (e.g. b2)" in checked.summary()


def test_an_id_indexed_twice_is_reported() -> None:
    checked = check_deliveries(IDS, ["g/a1", "g/b2", "g/c3"], IDS, ["a1", "b2", "b2", "c3"])
    assert not checked.ok
    assert checked.indexed_twice == ["b2"]


def test_the_email_id_is_what_follows_the_last_slash_of_the_tracking_value() -> None:
    assert email_id_of("team/a%2Fb/1234") == "1234"
    assert email_id_of("1234") == "1234"


def test_the_sink_reads_the_tracking_header_raw_whatever_its_case() -> None:
    raw = b"From: a@b.example\r\nx-lfx-tracking-ID: grp/123\r\nSubject: s\r\n\r\n"
    raw += b"X-LFX-TRACKING-ID: in the body"
    assert tracking_value(raw) == "grp/123"
    assert tracking_value(b"From: a@b.example\r\n\r\nbody") == ""


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile([3.0], 0.99) == 3
    assert math.isnan(percentile([], 0.5))


def result(**changes: object) -> Result:
    fields: dict[str, object] = {
        "scenario": Scenario(50, 64, processes=1, pool=0),
        "successes": 1000,
        "seconds": 4.0,
        "latencies": [0.1] * 1000,
        "errors": {},
        "relay_cpu_ms": 2.5,
        "sink_cpu_ms": 1.0,
        "nats_cpu_ms": 0.3,
        "peak_rss_mb": [80.0],
        "ready_seconds": [0.9],
        "verified": True,
        "ceilings": {"responder": 5000.0, "smtp": 320.0, "kv": 1200.0},
    }
    fields.update(changes)
    return Result(**fields)  # type: ignore[arg-type]


def test_the_table_gives_sends_per_second_as_a_share_of_the_tightest_ceiling() -> None:
    table = format_results([result()], default_pool=16)
    row = table.splitlines()[2]
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[0].endswith("pool=16 (default)")
    assert cells[1] == "250"
    assert "smtp 320/s" in cells
    assert "78%" in cells
    assert cells[-1] == "yes"


def test_the_table_marks_a_run_whose_deliveries_did_not_check_out() -> None:
    table = format_results([result(verified=False)], default_pool=16)
    assert table.splitlines()[2].rstrip().endswith("NO")


def test_the_table_lists_each_relay_process_rss() -> None:
    table = format_results(
        [result(scenario=Scenario(50, 256, processes=3), peak_rss_mb=[81.0, 79.4, 90.0])], 16
    )
    assert "81/79/90" in table


def test_metric_total_sums_every_labelled_sample_of_that_metric_only() -> None:
    text = "\n".join(
        [
            "# TYPE emailrelay_kv_conflicts_total counter",
            'emailrelay_kv_conflicts_total{bucket="email-recipients"} 2.0',
            'emailrelay_kv_conflicts_total{bucket="email-group-index"} 5.0',
            "emailrelay_kv_conflicts_created 1.7e9",
            "emailrelay_smtp_connections 16.0",
        ]
    )
    assert metric_total(text, "emailrelay_kv_conflicts_total") == 7
    assert metric_total(text, "emailrelay_smtp_connections") == 16
    assert metric_total(text, "emailrelay_requests_total") == 0


def test_profile_summary_shares_samples_by_area_and_by_leaf() -> None:
    stacks = [
        "run (trio/_core/_run.py:1);build (email/message.py:10);fold (email/policy.py:3) 3",
        "run (trio/_core/_run.py:1);get (nats/js/kv.py:5) 1",
    ]
    summary = summarize(stacks)
    inclusive, own, top = summary.split("\n", 1)[1].split("Self time")
    assert "4 samples" in summary
    assert " 75.0%  MIME building (stdlib email)" in inclusive
    assert " 25.0%  nats-py" in inclusive
    assert "trio" not in inclusive  # the root of every stack says nothing
    assert " 75.0%  MIME building (stdlib email)" in own
    assert " 75.0%  fold (email/policy.py:3)" in top


def test_a_ceiling_that_fails_is_reported_and_the_others_still_count() -> None:
    bench = bench_send.Bench(
        nats=None,  # type: ignore[arg-type]
        work_dir=Path("."),
        n=10,
        n_serial=5,
        warmup_cap=1,
        default_pool=16,
        ceilings_on=True,
        py_spy=None,
    )

    def broken() -> Ceiling:
        raise RuntimeError("the bridge moved")

    def working() -> Ceiling:
        return Ceiling("kv", "C=8", 1234.0, 0.01, 0.02, 0.3)

    assert bench._ceiling(("responder", 8), broken) is None
    assert bench._ceiling(("kv", 8), working) is not None
    assert bench.failed_ceilings == {("responder", 8): "RuntimeError: the bridge moved"}
