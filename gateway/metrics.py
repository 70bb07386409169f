"""Prometheus metrics. Labels are channel names, outcomes and statuses: never people or addresses."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

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
