"""Prometheus metrics. Labels are channel names, outcomes and statuses: never people or addresses."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

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
