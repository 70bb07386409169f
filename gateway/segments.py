"""Partner-side segments: an audience the partner holds (``audience.segments``), reached with one
request per language; the partner fans out to its users and reports aggregate receipts.

The ministry often does not know who is in a region; the super-app does. An advisory may name such a
segment (``{channel: push, segment: "geo:IR"}``) beside, or instead of, recipients of our own
directory. For each segment the planner stores one **segment delivery** per language the advisory
can be rendered in on that channel (the partner gives each user the language they use; the request
in the advisory's own first language also carries the users whose language is not sent — the
"default"). Its id, deterministic in (advisory, version, channel, segment, language), is the
idempotency key the partner sees: a replay after a crash is answered from the partner's memory, so
there is **one fan-out per language, ever**.

The sender (in processes with the ``dispatch`` role) sends planned segment deliveries — the advisory's
state and expiry read right before each request — retries with backoff up to ``dispatch.max_attempts``,
and tells the partner when a version it reached is **cancelled** (``cancel_segment``) or
**updated**: the new version's request names the one it ``replaces``, and the partner updates what
its users were told. Aggregate receipts (targeted, delivered, read, failed, cancelled; cumulative)
arrive at ``/segment-receipts/<channel>`` and are kept beside the request (gateway/receipts.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from channels.base import Adapter, SegmentMessage
from gateway.errors import PermanentError, RetryableError
from gateway.lifecycle import AdvisoryState, why_not_sent
from gateway.logging import get_logger
from gateway.models import Advisory, Status, now, segment_delivery_id
from gateway.rendering import Renderer
from gateway.settings import DispatchSettings
from gateway.store import SegmentDelivery, Store

log = get_logger(__name__)


def segment_rows(adv: Advisory, renderer: Renderer, adapters: Mapping[str, Adapter]) -> list[dict[str, Any]]:
    """The segment deliveries of an advisory version: per segment, one per renderable language."""
    rows: list[dict[str, Any]] = []
    for ref in adv.audience.segments:
        adapter = adapters.get(ref.channel)
        if adapter is None or not adapter.segments:
            continue  # intake refuses such advisories; an adapter removed since has nothing to send
        languages = sorted(renderer.languages(adv, adapter.kind, adapter.parts))
        default = renderer.choose_language(adv, None, adapter.kind, adapter.parts)
        for lang in languages:
            rows.append(
                {
                    "id": segment_delivery_id(adv.id, adv.version, ref.channel, ref.segment, lang),
                    "advisory_id": adv.id,
                    "version": adv.version,
                    "channel": ref.channel,
                    "segment": ref.segment,
                    "language": lang,
                    "is_default": lang == default,
                    "languages": "|".join(languages),
                }
            )
    return rows


class SegmentSender:
    def __init__(
        self,
        store: Store,
        renderer: Renderer,
        adapters: Mapping[str, Adapter],
        settings: DispatchSettings,
        poll_s: float = 0.5,
    ) -> None:
        self.store = store
        self.renderer = renderer
        self.adapters = adapters
        self.settings = settings
        self.poll_s = poll_s
        self._wakeup = asyncio.Event()
        self._not_before: dict[str, float] = {}  # segment delivery id -> loop time of its next attempt

    def wake(self) -> None:
        """Look for work now (segments were planned in this process)."""
        self._wakeup.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.step()
            except Exception as e:  # the store is down: try again next round
                log.error("segments.failed", error=f"{type(e).__name__}: {e}")
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.poll_s)

    async def step(self) -> int:
        """Send what is planned and due, and cancel what was withdrawn; returns requests made."""
        done = 0
        clock = asyncio.get_running_loop().time()
        for seg in await self.store.segments(status=Status.PLANNED.value):
            if self._not_before.get(seg.id, 0.0) <= clock:
                done += await self._send(seg)
        for seg in await self.store.segments_to_cancel():
            done += await self._cancel(seg)
        return done

    async def _send(self, seg: SegmentDelivery) -> int:
        adv = await self.store.advisory(seg.advisory_id, seg.version)
        adapter = self.adapters.get(seg.channel)
        if adv is None:
            return 0
        if adapter is None or not adapter.segments:
            await self.store.segment_ended(
                seg.id, Status.FAILED, f"channel {seg.channel!r} takes no segment requests here"
            )
            return 0
        why = why_not_sent(await self.store.advisory_state(adv.id, adv.version), adv.expires_at, now())
        if why is not None:
            status = Status.EXPIRED if why is AdvisoryState.EXPIRED else Status.CANCELLED
            await self.store.segment_ended(seg.id, status, f"advisory {why.value}")
            return 0
        try:
            parts = self.renderer.render(adv, seg.language, adapter.kind, adapter.parts)
            adapter.check_rendering(parts, adv)
        except Exception as e:  # the intake's render check passed; a template changed since
            await self.store.segment_ended(seg.id, Status.FAILED, f"rendering: {e}")
            return 0
        replaces = await self.store.replaced_by(seg)
        message = SegmentMessage(
            seg.id,
            seg.segment,
            seg.language,
            seg.languages,
            seg.is_default,
            parts,
            adv.id,
            adv.version,
            adv.priority,
            adv.expires_at,
            replaces,
        )
        try:
            accepted = await adapter.send_segment(message)
        except RetryableError as e:
            attempts = await self.store.segment_retry(seg.id, e.reason)
            if attempts >= self.settings.max_attempts:
                reason = f"attempts exhausted ({attempts}): {e.reason}"
                await self.store.segment_ended(seg.id, Status.FAILED, reason)
                log.warning("segment.failed", segment=seg.segment, language=seg.language, reason=reason)
            else:
                wait = min(self.settings.backoff_initial_s * 2**attempts, self.settings.backoff_max_s)
                self._not_before[seg.id] = asyncio.get_running_loop().time() + max(wait, e.retry_after or 0.0)
            return 1
        except PermanentError as e:
            await self.store.segment_ended(seg.id, Status.FAILED, str(e))
            return 1
        self._not_before.pop(seg.id, None)
        await asyncio.shield(self.store.segment_sent(seg, accepted.partner_id, accepted.targeted, replaces))
        log.info(
            "segment.sent",
            advisory_id=adv.id,
            version=adv.version,
            channel=seg.channel,
            segment=seg.segment,
            language=seg.language,
            targeted=accepted.targeted,
            replaces=replaces,
        )
        return 1

    async def _cancel(self, seg: SegmentDelivery) -> int:
        adapter = self.adapters.get(seg.channel)
        if adapter is None or seg.partner_id is None:
            return 0
        state = await self.store.advisory_state(seg.advisory_id, seg.version)
        reason = f"advisory {state.value if state else 'withdrawn'}"
        try:
            cancelled = await adapter.cancel_segment(seg.partner_id, seg.id)
        except RetryableError as e:
            log.warning("segment.cancel_retrying", segment=seg.segment, reason=e.reason)
            return 1  # asked again next round
        except PermanentError as e:  # the partner no longer knows it (its fan-out long over)
            log.warning("segment.cancel_refused", segment=seg.segment, reason=str(e))
            cancelled = 0
        await self.store.segment_cancelled(seg.id, reason, cancelled)
        log.info("segment.cancelled", advisory_id=seg.advisory_id, segment=seg.segment, cancelled=cancelled)
        return 1
