"""The cascade: a recipient not confirmed on channel N in time gets channel N+1.

An advisory's ``channels`` are ordered. Every ``interval_s``, for each channel, deliveries that were
sent (or went ``unknown``) more than that channel's ``cascade_window_s`` ago without a receipt, or
that failed, are planned on the next channel of the advisory that reaches the recipient — through
the planner, onto the advisory's lane. The delivery on channel N keeps its own history: a receipt
that comes late is recorded there and never undoes channel N+1 (the recipient then has both).
Cancelled, superseded and expired advisories do not cascade. Deliveries still waiting to be sent
(an open circuit, a queue) do not cascade either: they have not had their chance yet.

Marking a delivery cascaded comes last, so a crash repeats the step; the repeat plans the same
delivery ids, and dispatch sends only what is still pending.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from channels.base import Adapter
from gateway import metrics
from gateway.logging import get_logger
from gateway.models import now
from gateway.planner import Planner, plan_recipients, queued_by_channel
from gateway.retry import every
from gateway.settings import CascadeSettings
from gateway.store import Store

log = get_logger(__name__)


class Cascade:
    def __init__(
        self,
        store: Store,
        planner: Planner,
        adapters: Mapping[str, Adapter],
        settings: CascadeSettings,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self.store = store
        self.planner = planner
        self.adapters = adapters
        self.settings = settings
        self.clock = clock

    async def step(self) -> int:
        """One pass over every channel; returns how many deliveries were moved on."""
        moved = 0
        for channel, adapter in self.adapters.items():
            sent_before = self.clock() - timedelta(seconds=adapter.settings.cascade_window_s)
            while rows := await self.store.cascade_due(channel, sent_before, self.settings.page):
                groups: dict[tuple[str, int], list[str]] = defaultdict(list)
                for _, advisory_id, version, recipient_id in rows:
                    groups[(advisory_id, version)].append(recipient_id)
                for key, recipient_ids in groups.items():
                    await self._next_channel(key, channel, recipient_ids)
                await self.store.mark_cascaded([row[0] for row in rows])
                moved += len(rows)
                metrics.deliveries_cascaded_total.labels(channel).inc(len(rows))
                if len(rows) < self.settings.page:
                    break
        if moved:
            log.info("deliveries.cascaded", count=moved)
        return moved

    async def _next_channel(self, key: tuple[str, int], channel: str, recipient_ids: list[str]) -> None:
        adv = await self.store.advisory(*key)
        if adv is None or adv.channels[-1] == channel:
            return  # the last channel: nothing further to try
        recipients = await self.store.recipients_by_id(recipient_ids)
        planned = plan_recipients(
            adv, recipients, self.planner.kinds, after=channel, language=self.planner.language
        )
        ids = await self.store.insert_deliveries(adv.id, adv.version, planned)
        await self.planner.publish(
            adv, queued_by_channel(planned, ids), f"cascade-{channel}-{recipient_ids[0]}"
        )

    async def run(self, stopping: asyncio.Event) -> None:
        await every(self.step, self.settings.interval_s, "cascade.failed", stopping)
