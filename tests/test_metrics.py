"""gateway/metrics.py: a per-message histogram observed a batch at a time reads, on /metrics, exactly
as the client library's own histogram given the same values one at a time."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import PerMessageHistogram

BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


def test_a_batch_observed_at_once_reads_as_the_same_values_observed_one_by_one() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batched = PerMessageHistogram("latency_seconds", "per message", BUCKETS, ours)
    reference = Histogram("latency_seconds", "per message", ["channel"], buckets=BUCKETS, registry=theirs)
    rng = random.Random(3)
    for channel in ("push", "sms-http"):
        values = [rng.choice((0.0, 0.5, 1.0, 7.3, 2000.0)) * rng.random() for _ in range(500)]
        values += [1.0, 2.0, 1800.0, 1800.5]  # on the bounds, and past the last one
        batched.observe(channel, values[:200])
        batched.observe(channel, values[200:])
        for v in values:
            reference.labels(channel).observe(v)
    batched.observe_same("email", 3.0, 250)  # a batch accepted at one moment
    batched.observe_same("email", 3.0, 0)  # nothing sent: nothing observed
    for _ in range(250):
        reference.labels("email").observe(3.0)

    def samples(registry: CollectorRegistry) -> dict[str, float]:
        text = generate_latest(registry).decode()
        rows = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
        return {name: float(value) for name, value in rows if "_created" not in name}

    got, want = samples(ours), samples(theirs)
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name.split("{")[0].endswith("_sum"):  # added up in another order
            assert got[name] == pytest.approx(value, rel=1e-12), name
        else:  # buckets and counts: exactly
            assert got[name] == value, name
