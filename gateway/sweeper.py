"""The sweeper: transitions that time causes, not a message.

Every ``interval_s``: deliveries still pending when their advisory expires become ``expired``
(nothing is sent after ``expires_at``: dispatch checks too, before every attempt); deliveries
``sent`` longer than ``receipt_timeout_s`` ago with no receipt become ``unknown`` — shown apart from
delivered, and still moved to delivered or failed by a receipt that comes late; advisories waiting
in ``pending_approval`` longer than ``approval.timeout_s`` become ``expired`` (the approval timeout);
on PostgreSQL the delivery counters' deltas are folded (``Store.fold_counts``).
The updates are idempotent, so every gateway process may run a sweeper.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from gateway.logging import get_logger
from gateway.models import now
from gateway.retry import every
from gateway.settings import SweeperSettings
from gateway.store import Store

log = get_logger(__name__)


class Sweeper:
    def __init__(
        self,
        store: Store,
        settings: SweeperSettings,
        clock: Callable[[], datetime] = now,
        approval_timeout_s: float | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.approval_timeout_s = approval_timeout_s

    async def sweep(self) -> tuple[int, int]:
        """One pass; returns (expired, unknown)."""
        at = self.clock()
        await self.store.fold_counts()  # PostgreSQL: the counters' deltas (gateway/store/counts.py)
        expired = await self.store.expire_pending(at)
        unknown = await self.store.mark_unknown(at - timedelta(seconds=self.settings.receipt_timeout_s))
        if self.approval_timeout_s is not None:
            waited = at - timedelta(seconds=self.approval_timeout_s)
            for subject in await self.store.expire_unapproved(waited):
                log.warning("advisory.approval_timed_out", advisory=subject)
        if expired or unknown:
            log.info("deliveries.swept", expired=expired, unknown=unknown)
        return expired, unknown

    async def run(self, stopping: asyncio.Event) -> None:
        await every(self.sweep, self.settings.interval_s, "sweeper.failed", stopping)
