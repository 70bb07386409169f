"""A sandbox super-app push partner speaking docs/partner-push-api.md over real HTTP."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.sandbox.partner import SandboxPartner

MAX_BATCH = 500


class PushPartner(SandboxPartner):
    channel = "push"

    def routes(self) -> list[web.RouteDef]:
        return [self.batch_route("/v1/messages:batch", MAX_BATCH, self._take), *super().routes()]

    def _take(self, m: dict[str, Any]) -> dict[str, Any]:
        key = str(m.get("idempotency_key") or "")
        if not key or not m.get("user_ref") or not m.get("title") or not m.get("body"):
            self.rejected += 1
            return {"idempotency_key": key, "status": "rejected", "reason": "missing field"}
        advisory = f"{m.get('advisory_id')}@v{m.get('advisory_version')}"
        message_id, _ = self.accept(key, str(m["user_ref"]), advisory, str(m.get("language")))
        return {"idempotency_key": key, "status": "accepted", "message_id": message_id}
