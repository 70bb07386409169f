"""The operations room's figures over time (gateway/trends.py): quantiles interpolated within a
bucket as Prometheus' histogram_quantile does, and per-channel rates between two samples."""

from __future__ import annotations

import math

from gateway.trends import LATENCIES, Sample, Trends, chart, quantile


def test_a_quantile_is_interpolated_within_its_bucket() -> None:
    # 10 observations ≤ 1 s, 30 more ≤ 2 s, 60 more ≤ 5 s (cumulative 10, 40, 100)
    cumulative = {1.0: 10.0, 2.0: 40.0, 5.0: 100.0, math.inf: 100.0}
    assert quantile(0.1, cumulative) == 1.0
    assert quantile(0.25, cumulative) == 1.5  # 25th of 100: halfway through the (1, 2] bucket
    assert quantile(0.7, cumulative) == 3.5  # 70th: halfway through (2, 5]
    assert quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {1.0: 0.0, math.inf: 10.0}) == 1.0  # all beyond the last bound: its bound


def test_rates_and_series_come_from_the_difference_between_samples() -> None:
    trends = Trends(points=10)
    trends.samples.append(
        Sample(
            0.0,
            {"m": {"push": {1.0: 0, math.inf: 0}}, LATENCIES[0]: {"push": {10.0: 0, math.inf: 0}}},
            {"push": {"accepted": 100, "retry": 0}},
            {"push": 1.0},
        )
    )
    trends.samples.append(
        Sample(
            60.0,
            {"m": {"push": {1.0: 4, math.inf: 8}}, LATENCIES[0]: {"push": {10.0: 450, math.inf: 600}}},
            {"push": {"accepted": 700, "retry": 25, "rejected": 5}},
            {"push": 4.0},
        )
    )
    health = trends.health()["push"]
    assert health.sent_per_min == 600
    assert health.error_share == 30 / 630
    assert health.rate_limit_wait_s == 3.0
    assert health.within_10s == 0.75
    series = trends.series("m", 0.5)
    assert series == {"push": [(60.0, 1.0)]}
    drawn = chart("dispatch_p50", series)
    assert drawn.lines["push"] == "0.0,0.0"  # one point: left edge, at the top of the scale
    assert chart("empty", {}).lines == {}
