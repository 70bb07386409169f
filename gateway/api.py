"""The gateway's HTTP surface: health and readiness, Prometheus metrics, advisory status, plus the
routes other modules contribute (receipt webhooks, the press office's API, the feed). Errors are RFC
9457 problem+json naming the field.

``/healthz``: the process answers (liveness). ``/readyz``: the store and Kafka answer within 2 s
each (503 naming what does not), and each channel's circuit state — reported, not judged: a
partner's outage is no reason to take this instance out of rotation (its API, webhooks and other
channels still work).

Who may call what (bearer tokens, gateway/auth.py): ``ROUTE_ROLES``; a route not named there is
open — health, and the receipt webhooks, which partners sign with HMAC."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import metrics
from gateway.auth import Tokens, roles_table
from gateway.auth import middleware as auth_middleware
from gateway.metrics import REGISTRY
from gateway.store import Store

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from channels.base import Adapter

READY_TIMEOUT_S = 2.0


def problem(status: int, title: str, detail: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status, content_type="application/problem+json")


ROUTE_ROLES: dict[str, frozenset[str]] = {
    "/metrics": frozenset({"operator", "admin"}),
    "/advisories/{advisory_id}/status": frozenset({"press", "approver", "operator", "admin"}),
}


def build_app(
    store: Store,
    extra_routes: list[web.RouteDef],
    tokens: Tokens,
    extra_roles: Mapping[str, frozenset[str]] | None = None,
    producer: AIOKafkaProducer | None = None,
    adapters: Mapping[str, Adapter] | None = None,
) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(_: web.Request) -> web.Response:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(store.ping(), READY_TIMEOUT_S)
            checks["store"] = "ok"
        except Exception as e:
            checks["store"] = f"unreachable: {type(e).__name__}"
        if producer is not None:
            try:
                await asyncio.wait_for(producer.client.fetch_all_metadata(), READY_TIMEOUT_S)
                checks["kafka"] = "ok"
            except Exception as e:
                checks["kafka"] = f"unreachable: {type(e).__name__}"
        circuits = {name: a.circuit.state.value for name, a in (adapters or {}).items()}
        ok = all(v == "ok" for v in checks.values())
        body = {"status": "ready" if ok else "not ready", **checks, "channels": circuits}
        return web.json_response(body, status=200 if ok else 503)

    async def prometheus(_: web.Request) -> web.Response:
        # deliveries by channel and status from the counters: the same numbers status and the console show
        totals: dict[tuple[str, str], int] = {}
        for c in await store.progress():
            totals[(c.channel, c.status)] = totals.get((c.channel, c.status), 0) + c.n
        metrics.deliveries.clear()
        for (channel, status_), n in totals.items():
            metrics.deliveries.labels(channel, status_).set(n)
        metrics.segment_recipients.clear()
        for (channel, count), n in (await store.segment_totals()).items():
            metrics.segment_recipients.labels(channel, count).set(n)
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(request: web.Request) -> web.Response:
        advisory_id = request.match_info["advisory_id"]
        counts = await store.counts(advisory_id)
        segments = await store.segments(advisory_id)
        if not counts and not segments:
            return problem(
                404, "Unknown advisory", f"no deliveries for advisory {advisory_id!r}", field="advisory_id"
            )
        return web.json_response(
            {"advisory_id": advisory_id, "by_channel": counts, "segments": [s.as_dict() for s in segments]}
        )

    app = web.Application(
        client_max_size=4 * 1024 * 1024,
        middlewares=[auth_middleware(tokens, roles_table({**ROUTE_ROLES, **(extra_roles or {})}), problem)],
    )
    app.add_routes(
        [
            web.get("/healthz", health),
            web.get("/readyz", ready),
            web.get("/metrics", prometheus),
            web.get("/advisories/{advisory_id}/status", status),
            *extra_routes,
        ]
    )
    return app
