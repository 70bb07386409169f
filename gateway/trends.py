"""What the operations room draws over time, from this process's own Prometheus metrics: dispatch and
delivery latency (p50, p99) and, per channel, messages sent, the error share and rate-limit waits.

Every ``every_s`` a sample of the cumulative counters and histogram buckets is kept (a bounded
window: ``points`` samples); each figure is the difference between two samples, and a quantile is
interpolated within its bucket as Prometheus' ``histogram_quantile`` does. Per process: with several
instances each console shows its own (Prometheus and docs/monitoring aggregate them all).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.metrics import REGISTRY

LATENCIES = ("gateway_dispatch_latency_seconds", "gateway_delivery_latency_seconds")


@dataclass
class Sample:
    at: float
    # metric -> channel -> upper bound -> cumulative count
    buckets: dict[str, dict[str, dict[float, float]]] = field(default_factory=dict)
    # channel -> outcome -> messages (accepted, retry, rejected)
    messages: dict[str, dict[str, float]] = field(default_factory=dict)
    waited: dict[str, float] = field(default_factory=dict)  # channel -> rate-limit wait seconds


def sample(at: float | None = None) -> Sample:
    s = Sample(time.time() if at is None else at)
    for family in REGISTRY.collect():
        for m in family.samples:
            channel = m.labels.get("channel")
            if channel is None:
                continue
            if m.name.endswith("_bucket") and m.name.removesuffix("_bucket") in LATENCIES:
                per = s.buckets.setdefault(m.name.removesuffix("_bucket"), {}).setdefault(channel, {})
                per[float(m.labels["le"])] = m.value
            elif m.name == "gateway_channel_messages_total":
                s.messages.setdefault(channel, {})[m.labels["outcome"]] = m.value
            elif m.name == "gateway_rate_limit_wait_seconds_total":
                s.waited[channel] = m.value
    return s


def _crossing(q: float, cumulative: Mapping[float, float]) -> tuple[float, float, float, float, float] | None:
    """Where the ``q`` quantile (0 to 1) of a histogram given as cumulative counts per upper bound
    falls: its rank, and the bucket's lower bound, the count below it, its upper bound and the count
    up to it. None if the histogram is empty."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            return rank, lower, below, bound, count
        lower, below = bound, count
    return rank, lower, below, lower, below


def quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of a histogram given as cumulative counts per upper bound (None if empty),
    interpolated inside the bucket it falls in."""
    crossing = _crossing(q, cumulative)
    if crossing is None:
        return None
    rank, lower, below, bound, count = crossing
    if math.isinf(bound) or bound == lower:
        return lower  # beyond the last finite bucket: its bound is all one can say
    inside = count - below
    return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)


def bucket(q: float, cumulative: Mapping[float, float]) -> list[float] | None:
    """The bucket (lower, upper bound) the ``q`` quantile falls in (None if the histogram is empty)."""
    crossing = _crossing(q, cumulative)
    return None if crossing is None else [crossing[1], crossing[3]]


def _delta(new: Mapping[float, float], old: Mapping[float, float]) -> dict[float, float]:
    return {b: new[b] - old.get(b, 0.0) for b in new}


@dataclass(frozen=True, slots=True)
class Health:
    channel: str
    sent_per_min: float
    error_share: float | None
    rate_limit_wait_s: float
    within_10s: float | None  # the share of messages sent within 10 s of their advisory being stored


class Trends:
    def __init__(self, every_s: float = 5.0, points: int = 120) -> None:
        self.every_s = every_s
        self.samples: deque[Sample] = deque(maxlen=points)

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.samples.append(sample())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.every_s)

    def series(self, metric: str, q: float) -> dict[str, list[tuple[float, float]]]:
        """channel -> [(time, quantile over the interval ending then)] for intervals with messages."""
        out: dict[str, list[tuple[float, float]]] = {}
        points = list(self.samples)
        for old, new in itertools.pairwise(points):
            for channel, cumulative in new.buckets.get(metric, {}).items():
                value = quantile(q, _delta(cumulative, old.buckets.get(metric, {}).get(channel, {})))
                if value is not None:
                    out.setdefault(channel, []).append((new.at, value))
        return out

    def health(self, window_s: float = 300.0) -> dict[str, Health]:
        """Per channel over the last ``window_s``: messages sent a minute, the share rejected or to be
        retried, seconds waited for the rate limit."""
        if len(self.samples) < 2:
            return {}
        new = self.samples[-1]
        old = next((s for s in self.samples if s.at >= new.at - window_s), self.samples[0])
        minutes = max((new.at - old.at) / 60, 1e-9)
        out = {}
        for channel, outcomes in new.messages.items():
            before = old.messages.get(channel, {})
            d = {k: v - before.get(k, 0.0) for k, v in outcomes.items()}
            total = sum(d.values())
            errors = d.get("rejected", 0.0) + d.get("retry", 0.0)
            latency = _delta(
                new.buckets.get(LATENCIES[0], {}).get(channel, {}),
                old.buckets.get(LATENCIES[0], {}).get(channel, {}),
            )
            sent = latency.get(math.inf, 0.0)
            out[channel] = Health(
                channel,
                d.get("accepted", 0.0) / minutes,
                errors / total if total else None,
                new.waited.get(channel, 0.0) - old.waited.get(channel, 0.0),
                latency.get(10.0, 0.0) / sent if sent else None,
            )
        return out


@dataclass(frozen=True, slots=True)
class Chart:
    """Lines on one time and value scale, as SVG polyline points in a ``width`` × ``height`` box."""

    title: str
    lines: dict[str, str]
    top: float  # the value at the top edge
    span_s: float  # the time from the left edge to the right

    WIDTH = 600
    HEIGHT = 120


def chart(title: str, series: Mapping[str, list[tuple[float, float]]]) -> Chart:
    every = [p for points in series.values() for p in points]
    if not every:
        return Chart(title, {}, 0.0, 0.0)
    t0, t1 = min(t for t, _ in every), max(t for t, _ in every)
    top = max(v for _, v in every) or 1.0
    span = (t1 - t0) or 1.0
    w, h = Chart.WIDTH, Chart.HEIGHT
    lines = {
        channel: " ".join(f"{(t - t0) / span * w:.1f},{h - v / top * h:.1f}" for t, v in points)
        for channel, points in series.items()
    }
    return Chart(title, lines, top, t1 - t0)
