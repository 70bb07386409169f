"""Dispatch: chunks from the ``deliveries`` topic → render → channel adapter → results in the store.

Only deliveries still pending in the store are sent, and each carries its idempotency key, so a
chunk replayed after a crash never becomes a second notification. Offsets are committed after the
chunk's results are durable. Retries use tenacity: exponential backoff with full jitter, at least
the partner's Retry-After, bounded by attempts and by the advisory's expiry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from channels.base import Adapter, Message, Result
from gateway.errors import ContentError, RetryableError
from gateway.logging import get_logger
from gateway.models import Advisory, Chunk, Status, now
from gateway.rendering import Renderer
from gateway.settings import DispatchSettings
from gateway.store import Outcome, Store, WorkItem

log = get_logger(__name__)

RETRY_DELAY_S = 2.0


class _WaitRetryAfter(wait_random_exponential):
    """Full-jitter exponential backoff, but never sooner than the partner's Retry-After."""

    def __call__(self, retry_state: RetryCallState) -> float:
        backoff = super().__call__(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        after = exc.retry_after if isinstance(exc, RetryableError) and exc.retry_after else 0.0
        return max(backoff, after)


def _outcome(r: Result) -> Outcome | None:
    if r.outcome == "accepted":
        return Outcome(r.delivery_id, Status.SENT, partner_id=r.partner_id)
    if r.outcome == "rejected":
        return Outcome(r.delivery_id, Status.FAILED, reason=r.reason)
    return None


class Dispatcher:
    def __init__(
        self, store: Store, renderer: Renderer, adapters: Mapping[str, Adapter], settings: DispatchSettings
    ) -> None:
        self.store = store
        self.renderer = renderer
        self.adapters = adapters
        self.settings = settings
        self._advisories: dict[tuple[str, int], Advisory] = {}

    async def _advisory(self, chunk: Chunk) -> tuple[Advisory, str] | None:
        """The advisory (parsed once per process) and its current state (read every chunk, so a
        cancel is seen)."""
        key = (chunk.advisory_id, chunk.version)
        cached = self._advisories.get(key)
        if cached is None:
            loaded = await self.store.load_advisory(*key)
            if loaded is None:
                return None
            self._advisories[key] = loaded[0]
            return loaded
        state = await self.store.get_advisory_state(*key)
        return None if state is None else (cached, state[0])

    def _message(self, adv: Advisory, adapter: Adapter, item: WorkItem) -> Message:
        lang = self.renderer.choose_language(adv, item.recipient, adapter.kind, adapter.parts)
        if lang is None:
            raise ContentError(f"no language to render for channel {adapter.channel!r}")
        parts = self.renderer.render(
            adv, lang, adapter.kind, adapter.parts, item.recipient, adapter.optional_parts
        )
        address = item.recipient.address(adapter.kind)
        if address is None:
            raise ContentError(f"recipient has no {adapter.kind} address")
        return Message(
            item.delivery_id, address, parts, lang, adv.id, adv.version, adv.priority, adv.expires_at
        )

    async def handle_chunk(self, chunk: Chunk) -> None:
        loaded = await self._advisory(chunk)
        if loaded is None:
            log.error("dispatch.unknown_advisory", advisory_id=chunk.advisory_id, version=chunk.version)
            return
        adv, state = loaded
        if state == "cancelled":
            await self.store.record(
                Outcome(i, Status.CANCELLED, reason="advisory cancelled") for i in chunk.ids
            )
            return
        if adv.expires_at <= now():
            await self.store.record(Outcome(i, Status.EXPIRED, reason="advisory expired") for i in chunk.ids)
            return
        adapter = self.adapters[chunk.channel]
        items = await self.store.pending_work(chunk.ids)
        messages: list[Message] = []
        failed: list[Outcome] = []
        for item in items:
            try:
                messages.append(self._message(adv, adapter, item))
            except ContentError as e:
                failed.append(Outcome(item.delivery_id, Status.FAILED, reason=str(e)))
        if failed:
            await self.store.record(failed)
        for start in range(0, len(messages), adapter.batch_size):
            await self.send(adapter, adv, messages[start : start + adapter.batch_size])

    async def send(self, adapter: Adapter, adv: Advisory, batch: Sequence[Message]) -> None:
        """Send a batch until every message is accepted or rejected, or attempts or time run out."""
        remaining = list(batch)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=_WaitRetryAfter(multiplier=self.settings.backoff_initial_s, max=self.settings.backoff_max_s),
            retry=retry_if_exception_type(RetryableError),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if adv.expires_at <= now():
                        await self.store.record(
                            Outcome(m.delivery_id, Status.EXPIRED, reason="advisory expired")
                            for m in remaining
                        )
                        return
                    results = await adapter.send(remaining)
                    final = [o for o in map(_outcome, results) if o is not None]
                    await self.store.record(final, attempted=True)
                    retry = [r for r in results if r.outcome == "retry"]
                    if retry:
                        await self.store.note_retry(
                            [r.delivery_id for r in retry], retry[0].reason or "retry"
                        )
                        keep = {r.delivery_id for r in retry}
                        remaining = [m for m in remaining if m.delivery_id in keep]
                        after = max((r.retry_after or 0.0) for r in retry) or None
                        raise RetryableError(retry[0].reason or "partner asked to retry", after)
        except RetryableError as e:
            reason = f"attempts exhausted ({self.settings.max_attempts}): {e.reason}"
            await self.store.record(Outcome(m.delivery_id, Status.FAILED, reason=reason) for m in remaining)
            log.warning(
                "delivery.failed",
                channel=adapter.channel,
                advisory_id=adv.id,
                count=len(remaining),
                reason=reason,
            )

    async def run(self, consumer: AIOKafkaConsumer, stopping: asyncio.Event) -> None:
        """Consume chunks until ``stopping``; commit only after each fetched set is recorded."""
        while not stopping.is_set():
            fetched = await consumer.getmany(timeout_ms=500, max_records=self.settings.chunks_in_flight)
            records: list[Any] = [m for msgs in fetched.values() for m in msgs]
            if not records:
                continue
            try:
                await asyncio.gather(*(self._handle_record(m.value) for m in records))
                await asyncio.shield(consumer.commit())
            except Exception as e:  # the store or broker failed: nothing was committed, fetch again
                log.error("dispatch.retrying", error=f"{type(e).__name__}: {e}", count=len(records))
                await asyncio.sleep(RETRY_DELAY_S)
                await consumer.seek_to_committed()

    async def _handle_record(self, raw: bytes) -> None:
        try:
            chunk = Chunk.decode(raw)
        except (ValueError, KeyError, TypeError) as e:
            log.error("dispatch.bad_chunk", error=str(e))
            return
        await self.handle_chunk(chunk)
