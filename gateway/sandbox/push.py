"""A sandbox super-app push partner speaking docs/partner-push-api.md over real HTTP."""

from __future__ import annotations

import json

from aiohttp import web

from gateway.sandbox.partner import SandboxPartner

MAX_BATCH = 500


class PushPartner(SandboxPartner):
    channel = "push"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/messages:batch", self.messages), *super().routes()]

    async def messages(self, request: web.Request) -> web.Response:
        with self.open_request():
            return await self._messages(request)

    async def _messages(self, request: web.Request) -> web.Response:
        body = await request.read()
        if (refused := await self.http_fault(request, body)) is not None:
            return refused
        try:
            messages = json.loads(body)["messages"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'body must be {"messages": [...]}'}, status=400)
        if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_BATCH:
            return web.json_response({"error": f"messages: 1 to {MAX_BATCH} items"}, status=413)
        results = []
        for m in messages:
            key = str(m.get("idempotency_key") or "")
            if not key or not m.get("user_ref") or not m.get("title") or not m.get("body"):
                self.rejected += 1
                results.append({"idempotency_key": key, "status": "rejected", "reason": "missing field"})
                continue
            advisory = f"{m.get('advisory_id')}@v{m.get('advisory_version')}"
            message_id, _ = self.accept(key, str(m["user_ref"]), advisory, str(m.get("language")))
            results.append({"idempotency_key": key, "status": "accepted", "message_id": message_id})
        return web.json_response({"results": results})
