"""The Grafana dashboard and the Prometheus rules in docs/monitoring name only metrics the gateway
exports (a renamed metric would otherwise leave an empty panel or an alert that never fires)."""

from __future__ import annotations

import json
import re

import yaml

from gateway.metrics import REGISTRY
from gateway.settings import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs" / "monitoring"
NAME = re.compile(r"\b(gateway_[a-z0-9_]+)")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "")


def _exported() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
    return names


def _expressions() -> list[str]:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text(encoding="utf-8"))
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return exprs


def test_every_metric_the_dashboard_and_the_alert_rules_use_is_exported() -> None:
    exported = _exported()
    used = {m for e in _expressions() for m in NAME.findall(e)}
    assert used, "the expressions name metrics"
    unknown = {
        m
        for m in used
        if not any(m.removesuffix(s) in exported or m in exported for s in SUFFIXES if m.endswith(s))
    }
    assert not unknown, f"not exported by gateway/metrics.py: {sorted(unknown)}"


def test_every_alert_says_what_it_means() -> None:
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text(encoding="utf-8"))
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "GatewayFailureShareHigh",
        "GatewayCircuitOpenLong",
        "GatewayConsumerLagGrowing",
    }
    assert all(a["annotations"]["summary"] for a in alerts)
