"""Prometheus metrics. Labels are channel names, outcomes and statuses: never people or addresses."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)


class PerMessageHistogram(Collector):
    """A histogram of one figure per message, by channel, observed a batch at a time: a million
    messages cost a bisect and an addition each (the client library's ``observe`` takes two locks a
    value: 2.4 s of the event loop for a million messages' dispatch and delivery latencies). Exposed
    as any Prometheus histogram (``_bucket``, ``_sum``, ``_count``)."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = (*buckets, math.inf)
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()  # /metrics may be read from another thread than the loop's
        registry.register(self)

    def observe(self, channel: str, values: Iterable[float]) -> None:
        with self._lock:
            counts = self._counts.setdefault(channel, [0] * len(self._bounds))
            total = 0.0
            for v in values:
                counts[bisect.bisect_left(self._bounds, v)] += 1
                total += v
            self._sums[channel] = self._sums.get(channel, 0.0) + total

    def observe_same(self, channel: str, value: float, n: int) -> None:
        """``n`` messages, each with ``value`` (a batch sent at one moment)."""
        if n <= 0:
            return
        with self._lock:
            counts = self._counts.setdefault(channel, [0] * len(self._bounds))
            counts[bisect.bisect_left(self._bounds, value)] += n
            self._sums[channel] = self._sums.get(channel, 0.0) + value * n

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=["channel"])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["channel"])
        with self._lock:
            for channel, counts in sorted(self._counts.items()):
                cumulative, buckets = 0, []
                for bound, n in zip(self._bounds, counts, strict=True):
                    cumulative += n
                    buckets.append(("+Inf" if math.isinf(bound) else str(float(bound)), cumulative))
                family.add_metric([channel], buckets, self._sums[channel])
        yield family


advisories_total = Counter(
    "gateway_advisories_total", "Advisories taken from the topic, by outcome", ["outcome"], registry=REGISTRY
)
deliveries_planned_total = Counter(
    "gateway_deliveries_planned_total", "Deliveries planned", ["channel"], registry=REGISTRY
)
channel_messages_total = Counter(
    "gateway_channel_messages_total",
    "Messages handed to a channel, by result",
    ["channel", "outcome"],
    registry=REGISTRY,
)
channel_request_seconds = Histogram(
    "gateway_channel_request_seconds", "Time for one partner batch request", ["channel"], registry=REGISTRY
)
receipts_total = Counter(
    "gateway_receipts_total",
    "Delivery receipts received, by status",
    ["channel", "status"],
    registry=REGISTRY,
)
circuit_open = Gauge(
    "gateway_circuit_open",
    "1 while a channel provider's circuit is open or half-open",
    ["channel"],
    registry=REGISTRY,
)
dispatch_buffered_chunks = Gauge(
    "gateway_dispatch_buffered_chunks",
    "Chunks fetched and not yet finished, by lane (consumption pauses at the bound)",
    ["lane"],
    registry=REGISTRY,
)
deliveries_cascaded_total = Counter(
    "gateway_deliveries_cascaded_total",
    "Recipients sent the next channel of the cascade, by the channel they moved from",
    ["channel"],
    registry=REGISTRY,
)
dead_letters_total = Counter(
    "gateway_dead_letters_total",
    "Advisory records sent to the dead-letter topic, by kind of error (decode, schema, content, …)",
    ["error"],
    registry=REGISTRY,
)
receipts_unmatched_total = Counter(
    "gateway_receipts_unmatched_total",
    "Receipts naming no delivery this gateway knows (not applied, not published)",
    ["channel"],
    registry=REGISTRY,
)

deliveries = Gauge(
    "gateway_deliveries",
    "Deliveries by channel and status, from the store's counters (every advisory; the same on every "
    "instance: aggregate with max, not sum)",
    ["channel", "status"],
    registry=REGISTRY,
)
segment_recipients = Gauge(
    "gateway_segment_recipients",
    "Partner-side segments: the partners' aggregate counts of their users (targeted, delivered, read, "
    "failed, cancelled) and our segment requests by status (requests_<status>), per channel; from the "
    "store at each scrape (the same on every instance)",
    ["channel", "count"],
    registry=REGISTRY,
)
segment_receipts_total = Counter(
    "gateway_segment_receipts_total",
    "Aggregate receipts for segment requests applied",
    ["channel"],
    registry=REGISTRY,
)
dispatch_latency_seconds = PerMessageHistogram(
    "gateway_dispatch_latency_seconds",
    "From the advisory stored to its message accepted by the partner (sent), per message",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
delivery_latency_seconds = PerMessageHistogram(
    "gateway_delivery_latency_seconds",
    "From sent to the partner's receipt saying delivered (or read), per message",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
retries_total = Counter(
    "gateway_retries_total", "Attempts that will be retried, by channel", ["channel"], registry=REGISTRY
)
rate_limit_wait_seconds_total = Counter(
    "gateway_rate_limit_wait_seconds_total",
    "Time dispatch waited for a channel's rate limit (tokens per second) before sending",
    ["channel"],
    registry=REGISTRY,
)
consumer_lag = Gauge(
    "gateway_consumer_lag",
    "Records not yet consumed by this instance's consumer of a group (its assigned partitions)",
    ["group"],
    registry=REGISTRY,
)
events_published_total = Counter(
    "gateway_delivery_events_published_total",
    "Delivery status changes published to the delivery-events topic",
    registry=REGISTRY,
)
events_lag_seconds = Gauge(
    "gateway_delivery_events_lag_seconds",
    "How long the oldest delivery event in the outbox had waited when this instance's publisher last "
    "took events (0: it found the outbox empty)",
    registry=REGISTRY,
)
webhook_deliveries_total = Counter(
    "gateway_event_webhook_batches_total",
    "Event batches posted to a configured webhook, by webhook name and outcome",
    ["webhook", "outcome"],
    registry=REGISTRY,
)
