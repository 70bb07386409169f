"""A sandbox super-app push partner speaking docs/partner-push-api.md over real HTTP: message batches,
and segments it holds (``segment_size`` virtual users, spread over ``segment_languages``) that it fans
out in ``segment_steps`` steps, reporting signed aggregate receipts after each."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.sandbox.partner import SandboxPartner

MAX_BATCH = 500
SEGMENT_LANGUAGES = {"kk": 0.45, "ru": 0.40, "en": 0.15}  # the virtual users' languages


@dataclass
class Fanout:
    """One segment request being fanned out to the partner's users."""

    key: str
    message_id: str
    advisory: str  # "id@vN"
    segment: str
    language: str
    targeted: int
    delivered: int = 0
    read: int = 0
    failed: int = 0
    cancelled: int = 0
    final: bool = False
    updated_by: str | None = None  # the message id of the request that replaced this one
    body: dict[str, Any] = field(default_factory=dict)

    def receipt(self) -> dict[str, Any]:
        return {
            "idempotency_key": self.key,
            "message_id": self.message_id,
            "language": self.language,
            "targeted": self.targeted,
            "delivered": self.delivered,
            "read": self.read,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "final": self.final,
        }


class PushPartner(SandboxPartner):
    channel = "push"

    def __init__(self, *args: Any, segment_size: int = 1_000_000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.segment_size = segment_size
        self.segment_languages = dict(SEGMENT_LANGUAGES)
        self.segment_steps = 4
        self.fanouts: dict[str, Fanout] = {}  # idempotency key -> fan-out
        self.by_message: dict[str, Fanout] = {}
        self.segment_requests = 0
        self.segment_replays = 0
        self.segment_cancels = 0
        self._fanning: set[asyncio.Task[None]] = set()

    def routes(self) -> list[web.RouteDef]:
        return [
            self.batch_route("/v1/messages:batch", MAX_BATCH, self._take),
            web.post("/v1/segments:send", self._segment_send),
            web.post("/v1/segments/{message_id}:cancel", self._segment_cancel),
            *super().routes(),
        ]

    async def stop(self) -> None:
        for task in self._fanning:
            task.cancel()
        await asyncio.gather(*self._fanning, return_exceptions=True)
        await super().stop()

    async def set_config(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.segment_size = int(body.get("segment_size", self.segment_size))
        self.segment_languages = dict(body.get("segment_languages", self.segment_languages))
        self.segment_steps = max(1, int(body.get("segment_steps", self.segment_steps)))
        return await super().set_config(request)

    def stats(self, since: float | None = None) -> dict[str, Any]:
        started: dict[str, int] = {}
        for f in self.fanouts.values():
            name = f"{f.advisory}/{f.segment}/{f.language}"
            started[name] = started.get(name, 0) + 1
        return {
            **super().stats(since),
            "segment_requests": self.segment_requests,
            "segment_replays": self.segment_replays,
            "segment_cancels": self.segment_cancels,
            # fan-outs started per advisory version × segment × language: more than 1 is a duplicate
            "segment_fanouts": started,
            "segments": {
                f.message_id: {**f.receipt(), "updated_by": f.updated_by} for f in self.fanouts.values()
            },
        }

    def _take(self, messages: list[Any]) -> list[dict[str, Any]]:
        """A batch: each message answered in order, the new ones counted per advisory at once."""
        results: list[dict[str, Any]] = []
        taken: dict[str, tuple[list[str], list[str]]] = {}  # advisory -> (recipients, languages)
        named: tuple[Any, Any] | None = None
        group: tuple[list[str], list[str]] = ([], [])
        for m in messages:
            try:
                key, user = m["idempotency_key"], m["user_ref"]
                if not (key and user and m["title"] and m["body"]):
                    raise ValueError("empty field")
            except (KeyError, TypeError, ValueError):
                self.rejected += 1
                key = m.get("idempotency_key") if isinstance(m, dict) else None
                results.append(
                    {"idempotency_key": str(key or ""), "status": "rejected", "reason": "missing field"}
                )
                continue
            key = key if type(key) is str else str(key)
            message_id, first = self.answer(key)
            results.append({"idempotency_key": key, "status": "accepted", "message_id": message_id})
            if not first:
                continue
            if named != (advisory := (m.get("advisory_id"), m.get("advisory_version"))):
                named = advisory
                group = taken.setdefault(f"{advisory[0]}@v{advisory[1]}", ([], []))
            group[0].append(user if type(user) is str else str(user))
            group[1].append(m.get("language"))
        for advisory_key, (recipients, languages) in taken.items():
            self.count_many(advisory_key, recipients, [str(x) for x in languages])
        return results

    # -- segments ---------------------------------------------------------------------------------

    def _targeted(self, language: str, languages: list[str], default: bool) -> int:
        """The segment's users this request reaches: those using ``language`` and, for the default
        request, those whose language is not sent at all."""
        shares = self.segment_languages
        share = shares.get(language, 0.0)
        if default:
            share += sum(v for k, v in shares.items() if k not in languages)
        return round(self.segment_size * share)

    async def _segment_send(self, request: web.Request) -> web.Response:
        with self.open_request():
            body = await request.read()
            if (refused := await self.http_fault(request, body)) is not None:
                return refused
            try:
                m = orjson.loads(body)
                key, segment, language = str(m["idempotency_key"]), str(m["segment"]), str(m["language"])
                languages = [str(x) for x in m["languages"]]
                if not (key and segment and language and m["title"] and m["body"]):
                    raise ValueError("empty field")
            except (ValueError, KeyError, TypeError) as e:
                self.rejected += 1
                return web.json_response({"status": "rejected", "reason": f"malformed: {e}"}, status=400)
            self.segment_requests += 1
            known = self.fanouts.get(key)
            if known is not None:  # a replay: the first answer, no second fan-out
                self.segment_replays += 1
                return self._segment_answer(known)
            f = Fanout(
                key,
                f"seg-{self._id_prefix}{next(self._ids):x}",
                f"{m.get('advisory_id')}@v{m.get('advisory_version')}",
                segment,
                language,
                self._targeted(language, languages, bool(m.get("default"))),
                body={"title": m["title"], "body": m["body"]},
            )
            replaced = self.by_message.get(str(m.get("replaces") or ""))
            if replaced is not None and not replaced.final:
                # an update: users not yet reached get the new text instead; the old fan-out ends
                replaced.cancelled = replaced.targeted - replaced.delivered - replaced.failed
                replaced.final = True
            if replaced is not None:
                replaced.updated_by = f.message_id
            self.fanouts[key] = f
            self.by_message[f.message_id] = f
            task = asyncio.create_task(self._fan_out(f), name=f"fanout-{f.message_id}")
            self._fanning.add(task)
            task.add_done_callback(self._fanning.discard)
            return self._segment_answer(f)

    @staticmethod
    def _segment_answer(f: Fanout) -> web.Response:
        answer = {"status": "accepted", "message_id": f.message_id, "targeted": f.targeted}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def _segment_cancel(self, request: web.Request) -> web.Response:
        with self.open_request():
            body = await request.read()
            if (refused := await self.http_fault(request, body)) is not None:
                return refused
            f = self.by_message.get(request.match_info["message_id"])
            if f is None:
                return web.json_response({"error": "unknown message_id"}, status=404)
            self.segment_cancels += 1
            if not f.final:
                f.cancelled = f.targeted - f.delivered - f.failed
                f.final = True
                await self._post_segment_receipt(f)
            return web.json_response({"message_id": f.message_id, "cancelled": f.cancelled})

    async def _fan_out(self, f: Fanout) -> None:
        """Reach the segment's users in steps (each ``receipt_delay_s``), 2 % failing, half reading
        at the end; an aggregate receipt after each step. A cancel or an update stops it."""
        steps = self.segment_steps
        for step in range(1, steps + 1):
            await asyncio.sleep(self.receipt_delay_s)  # the partner's own fan-out time
            if f.final:
                return  # cancelled or replaced: that receipt was sent by whoever ended it
            reached = f.targeted * step // steps
            f.failed = reached // 50
            f.delivered = reached - f.failed
            if step == steps:
                f.read = f.delivered // 2
                f.final = True
            await self._post_segment_receipt(f)

    async def _post_segment_receipt(self, f: Fanout) -> None:
        """Post the fan-out's counts (cumulative) until the gateway takes them."""
        backoff = 0.2
        while self.send_receipts and self.receipt_url:
            url = self.receipt_url.replace("/receipts/", "/segment-receipts/")
            if await self._post_receipts([f.receipt()], url=url, key="segment_receipts"):
                return
            await asyncio.sleep(backoff)  # the gateway is down: as a partner would, try again later
            backoff = min(backoff * 2, 5.0)
