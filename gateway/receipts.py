"""Receipts: a partner's signed webhook call → verify → map to delivery status → store → events.

A call that is not signed by the partner, or a signed call already applied (a replay), is answered
401 and changes nothing. Receipts move a
delivery only forward (``Status.rank``), so duplicate and out-of-order receipts are harmless. Each
receipt that moves a delivery becomes a delivery event (the store's outbox, gateway/events.py).

A receipt matched by the partner's id (an SMSC's message id, a shared e-mail's) may come before the
gateway has recorded that id: such a receipt is held in the store and tried again every
``receipts.retry_s`` (``ReceiptWebhook.run``), given up after ``receipts.hold_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import TypeVar

from aiohttp import web

from channels.base import MAX_SKEW_S, SIGNATURE_HEADER, Adapter, Receipt
from gateway import metrics
from gateway.api import problem
from gateway.errors import AuthError, InputError
from gateway.logging import get_logger
from gateway.models import now
from gateway.retry import every
from gateway.settings import ReceiptsSettings
from gateway.store import AppliedReceipts, Outcome, Store

log = get_logger(__name__)

MAX_BODY = 4 * 1024 * 1024
T = TypeVar("T")


async def read_limited(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None if it is longer than ``limit`` (read no further than that)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for block in request.content.iter_chunked(64 * 1024):
        body += block
        if len(body) > limit:
            return None
    return bytes(body)


class ReplayGuard:
    """Signatures of webhook calls already applied, for as long as their timestamp is accepted: the
    same signed call again is refused (401), so a captured call cannot be replayed. Per process (a
    replay to another instance is caught only by the rank guard, which makes it harmless)."""

    def __init__(self, window_s: float = 2 * MAX_SKEW_S) -> None:
        self.window_s = window_s
        self._until: OrderedDict[str, float] = OrderedDict()

    def check(self, signature: str) -> None:
        self._forget_old()
        if signature and signature in self._until:
            raise AuthError("replayed: this signed call was already applied")

    def seen(self, signature: str) -> None:
        if signature:
            self._until[signature] = time.monotonic() + self.window_s
            self._until.move_to_end(signature)

    def _forget_old(self) -> None:
        now_ = time.monotonic()
        while self._until and next(iter(self._until.values())) < now_:
            self._until.popitem(last=False)


class ReceiptWebhook:
    def __init__(
        self, store: Store, adapters: Mapping[str, Adapter], settings: ReceiptsSettings | None = None
    ) -> None:
        self.store = store
        self.adapters = adapters
        self.settings = settings or ReceiptsSettings()
        self.replays = ReplayGuard()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/receipts/{channel}", self.handle),
            web.post("/receipts/{channel}/{provider}", self.handle),
            web.post("/segment-receipts/{channel}", self.handle_segments),
        ]

    async def _signed(
        self,
        request: web.Request,
        parse: Callable[[bytes, Mapping[str, str]], list[T]],
        what: str,
    ) -> tuple[list[T], str] | web.Response:
        """The body parsed by ``parse`` (which verifies the partner's signature) and the signature; or
        the problem response: 413 too large, 401 not signed or replayed, 400 malformed (``what``)."""
        channel = request.match_info["channel"]
        body = await read_limited(request, MAX_BODY)
        if body is None:
            return problem(413, "Too large", f"receipt batches are limited to {MAX_BODY} bytes", field="body")
        signature = request.headers.get(SIGNATURE_HEADER, "")
        try:
            found = parse(body, request.headers)
            self.replays.check(signature)
        except AuthError as e:
            log.warning("receipt.rejected", channel=channel, reason=str(e))
            return problem(401, "Unauthenticated", str(e))
        except Exception as e:  # whatever parsing the body raised, the body is at fault: 400, not 500
            reason = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {str(e)[:200]}"
            return problem(400, f"Malformed {what.replace('_', ' ')}", reason, field=what)
        return found, signature

    def _adapter(self, channel: str) -> Adapter | web.Response:
        adapter = self.adapters.get(channel)
        if adapter is None:
            return problem(
                404, "Unknown channel", f"no channel {channel!r} is configured here", field="channel"
            )
        return adapter

    async def handle(self, request: web.Request) -> web.Response:
        channel = request.match_info["channel"]
        provider = request.match_info.get("provider")
        adapter = self._adapter(channel)
        if isinstance(adapter, web.Response):
            return adapter
        try:
            parser = adapter.for_receipts(provider)
        except KeyError:
            return problem(
                404, "Unknown provider", f"channel {channel!r} has no provider {provider!r}", field="provider"
            )
        signed = await self._signed(request, parser.parse_receipts, "receipts")
        if isinstance(signed, web.Response):
            return signed
        found, signature = signed
        applied = await self._apply(channel, adapter, found)
        self.replays.seen(signature)  # only once applied: a partner's retry after a failure is no replay
        moved = len({o.delivery_id for o in applied.moved})
        return web.json_response({"received": len(found), "moved": moved, "held": applied.held})

    async def handle_segments(self, request: web.Request) -> web.Response:
        """A partner's aggregate receipts for segment requests (gateway/segments.py): verified like
        any receipt call; counts only grow, so a repeated or late one changes nothing."""
        channel = request.match_info["channel"]
        adapter = self._adapter(channel)
        if isinstance(adapter, web.Response):
            return adapter
        signed = await self._signed(request, adapter.parse_segment_receipts, "segment_receipts")
        if isinstance(signed, web.Response):
            return signed
        found, signature = signed
        applied, unknown = await asyncio.shield(self.store.apply_segment_receipts(channel, found))
        self.replays.seen(signature)
        metrics.segment_receipts_total.labels(channel).inc(applied)
        if unknown:
            metrics.receipts_unmatched_total.labels(channel).inc(unknown)
            log.warning("segment_receipts.unmatched", channel=channel, count=unknown)
        return web.json_response({"received": len(found), "applied": applied})

    async def apply(self, channel: str, adapter: Adapter, found: Sequence[Receipt]) -> int:
        """Store receipts (rank-guarded; each one that moves a delivery is a delivery event, written
        by the store with the move) and tell the adapter; returns deliveries moved. A receipt naming
        no delivery of ours is counted and logged, never an event. Used by the webhooks and, for
        protocols that bring receipts themselves (SMPP), as their sink."""
        applied = await self._apply(channel, adapter, found)
        return len({o.delivery_id for o in applied.moved})

    async def _apply(self, channel: str, adapter: Adapter, found: Sequence[Receipt]) -> AppliedReceipts:
        outcomes = [Outcome(r.delivery_id, r.status, partner_id=r.partner_id) for r in found]
        applied = await asyncio.shield(self.store.apply_receipts(channel, outcomes))
        adapter.receipts_seen(found)
        self._observe(channel, applied)
        log.info(
            "receipts.applied",
            channel=channel,
            count=len(outcomes),
            moved=len(applied.moved),
            unchanged=applied.unchanged,
            held=applied.held,
            unmatched=len(applied.unknown),
        )
        return applied

    async def retry_held(self) -> int:
        """Held receipts tried again (their partner ids may be recorded by now); returns how many
        moved a delivery. Those held longer than ``hold_s`` are given up, counted unmatched."""
        give_up_before = now() - timedelta(seconds=self.settings.hold_s)
        moved = 0
        for channel, applied in await asyncio.shield(self.store.apply_held(give_up_before)):
            self._observe(channel, applied)
            moved += len(applied.moved)
            if applied.moved or applied.unknown:
                log.info(
                    "receipts.held_applied",
                    channel=channel,
                    moved=len(applied.moved),
                    still_held=applied.held,
                    given_up=len(applied.unknown),
                )
        return moved

    async def run(self, stopping: asyncio.Event) -> None:
        """``retry_held`` every ``retry_s`` until ``stopping``."""
        await every(self.retry_held, self.settings.retry_s, "receipts.held_failed", stopping)

    def _observe(self, channel: str, applied: AppliedReceipts) -> None:
        """Metrics and the log line for what a batch of receipts did."""
        metrics.delivery_latency_seconds.observe(channel, (max(0.0, s) for s in applied.reached_after_s))
        for status, n in Counter(o.status.value for o in applied.moved).items():
            metrics.receipts_total.labels(channel, status).inc(n)
        if applied.unknown:
            metrics.receipts_unmatched_total.labels(channel).inc(len(applied.unknown))
            log.warning(
                "receipts.unmatched",
                channel=channel,
                count=len(applied.unknown),
                partner_ids=[o.partner_id for o in applied.unknown[:5]],
            )

    def sink(self, channel: str, adapter: Adapter) -> Callable[[Sequence[Receipt]], Awaitable[None]]:
        async def take(found: Sequence[Receipt]) -> None:
            await self.apply(channel, adapter, found)

        return take
