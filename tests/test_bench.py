"""``broadcast-gateway bench`` at a small size: the floor, Apprise and the gateway each reach every
recipient once through the same sandbox partner, and the report carries what docs/performance.md
is built from (no timing is asserted: performance is measured, not tested)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.bench import URGENT_AUDIENCE, run_bench

pytestmark = pytest.mark.slow


async def test_bench_reports_the_gateway_beside_the_floor_and_apprise(tmp_path: Path) -> None:
    chart = tmp_path / "bench.png"
    report = await run_bench(
        2000, "push", deadline_s=120, apprise_limit=200, urgent=2, chart=chart, profile=None
    )
    assert "error" not in report, report.get("error")
    floor, apprise, gateway = report["floor"], report["apprise"], report["gateway"]
    assert (floor["accepted"], floor["duplicates"]) == (2000, 0)
    assert (apprise["accepted"], apprise["failed"]) == (200, 0)
    assert (gateway["partner_unique"], gateway["lost"], gateway["duplicates"]) == (2000, 0, 0)
    assert gateway["store"] == {"delivered": 2000}
    assert gateway["urgent"]["published"] == gateway["urgent"]["reached_partner"] == 2
    assert gateway["all_delivered_s"] >= gateway["all_sent_s"] > 0
    # events not yet published when all were final, of the three each delivery makes (bulk, urgent)
    assert 0 <= gateway["events_waiting_at_all_delivered"] <= 3 * (2000 + 2 * URGENT_AUDIENCE)
    assert report["counters_agree"] is True
    latency = gateway["dispatch_latency"]  # interpolated inside a histogram bucket, which is reported
    low, high = latency["p99_bucket_s"]
    assert low <= latency["p99_s"] <= high
    assert {"gateway", "sandbox", "broker", "bench"} <= set(report["processes"])
    assert report["processes"]["gateway"]["peak_rss_mb"] > 0
    assert report["gateway_over_floor"] > 0
    assert report["apprise_over_floor"] > 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_bench_with_planning_in_a_second_process_reaches_everyone_once(tmp_path: Path) -> None:
    """``--planner-process``: one gateway plans (roles: intake), the measured one dispatches and takes
    receipts, both on the one store; every recipient reached once, both processes measured."""
    report = await run_bench(
        1000,
        "push",
        deadline_s=120,
        apprise_limit=0,
        urgent=0,
        chart=None,
        profile=None,
        skip_floor=True,
        planner_process=True,
    )
    assert "error" not in report, report.get("error")
    gateway = report["gateway"]
    assert (gateway["partner_unique"], gateway["lost"], gateway["duplicates"]) == (1000, 0, 0)
    assert gateway["store"] == {"delivered": 1000}
    assert report["counters_agree"] is True
    assert report["processes"]["planner"]["cpu_s"] > 0
    assert report["processes"]["gateway"]["cpu_s"] > 0
