"""The gateway's HTTP surface: health, Prometheus metrics, advisory status, plus the routes other
modules contribute (receipt webhooks). Errors are RFC 9457 problem+json naming the field.

Who may call what (bearer tokens, gateway/auth.py): ``ROUTE_ROLES``; a route not named there is
open — health, and the receipt webhooks, which partners sign with HMAC."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import Tokens, roles_table
from gateway.auth import middleware as auth_middleware
from gateway.metrics import REGISTRY
from gateway.store import Store


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
) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(request: web.Request) -> web.Response:
        advisory_id = request.match_info["advisory_id"]
        counts = await store.counts(advisory_id)
        if not counts:
            return problem(
                404, "Unknown advisory", f"no deliveries for advisory {advisory_id!r}", field="advisory_id"
            )
        return web.json_response({"advisory_id": advisory_id, "by_channel": counts})

    app = web.Application(
        client_max_size=4 * 1024 * 1024,
        middlewares=[auth_middleware(tokens, roles_table({**ROUTE_ROLES, **(extra_roles or {})}), problem)],
    )
    app.add_routes(
        [
            web.get("/healthz", health),
            web.get("/metrics", prometheus),
            web.get("/advisories/{advisory_id}/status", status),
            *extra_routes,
        ]
    )
    return app
