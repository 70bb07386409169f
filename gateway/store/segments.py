"""Partner-side segments (gateway/segments.py): one request per advisory version x channel x segment x
language, and the partner's aggregate receipts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from gateway.lifecycle import A
from gateway.logging import mask_pii_text
from gateway.models import SEGMENT_COUNTS, SegmentReceipt, Status, aware, now
from gateway.schema import advisories, segment_deliveries
from gateway.store.base import StoreBase


@dataclass(frozen=True, slots=True)
class SegmentDelivery:
    """One request to a partner's segment in one language, and what the partner reported of it."""

    id: str
    advisory_id: str
    version: int
    channel: str
    segment: str
    language: str
    is_default: bool
    languages: tuple[str, ...]
    status: str
    attempts: int
    partner_id: str | None
    replaces: str | None
    reason: str | None
    cancel: str | None
    counts: dict[str, int]  # SEGMENT_COUNTS: the partner's aggregate receipts
    final: bool
    updated_at: datetime
    sent_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "segment": self.segment,
            "language": self.language,
            "default_language": self.is_default,
            "version": self.version,
            "status": self.status,
            "reason": self.reason,
            "partner_id": self.partner_id,
            **self.counts,
            "final": self.final,
            "sent_at": self.sent_at.isoformat() if self.sent_at else None,
        }


def _segment(r: sa.RowMapping) -> SegmentDelivery:
    return SegmentDelivery(
        id=r["id"],
        advisory_id=r["advisory_id"],
        version=r["version"],
        channel=r["channel"],
        segment=r["segment"],
        language=r["language"],
        is_default=bool(r["is_default"]),
        languages=tuple(x for x in r["languages"].split("|") if x),
        status=r["status"],
        attempts=r["attempts"],
        partner_id=r["partner_id"],
        replaces=r["replaces"],
        reason=r["reason"],
        cancel=r["cancel"],
        counts={k: int(r[k]) for k in SEGMENT_COUNTS},
        final=bool(r["final"]),
        updated_at=aware(r["updated_at"]),
        sent_at=aware(r["sent_at"]) if r["sent_at"] is not None else None,
    )


def _grown(column: sa.Column[Any], value: int) -> sa.ColumnElement[Any]:
    """``column`` or ``value``, whichever is larger: counts reported later never shrink."""
    return sa.case((column < value, value), else_=column)


def _stored(reason: str) -> str:
    """A segment request's reason as stored: often the partner's own words, shown by the status API
    and the console, so masked as the logs and the deliveries' reasons are (no phone number or
    e-mail address), and cut to the column."""
    return mask_pii_text(reason)[:500]


class SegmentsStore(StoreBase):
    """Segment requests to partners and their aggregate receipts."""

    # -- partner-side segments ----------------------------------------------------------------

    async def plan_segments(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert planned segment deliveries; existing ones (a replay) are left as they are."""
        if not rows:
            return
        at = now()
        async with self._begin() as conn:
            await conn.execute(
                self._insert(segment_deliveries).on_conflict_do_nothing(),
                [{**r, "status": Status.PLANNED.value, "updated_at": at} for r in rows],
            )

    async def segments(
        self, advisory_id: str | None = None, status: str | None = None
    ) -> list[SegmentDelivery]:
        """Segment deliveries (of one advisory, or with one status), by version, channel, segment,
        language."""
        q = sa.select(segment_deliveries)
        if advisory_id is not None:
            q = q.where(segment_deliveries.c.advisory_id == advisory_id)
        if status is not None:
            q = q.where(segment_deliveries.c.status == status)
        q = q.order_by(
            segment_deliveries.c.version,
            segment_deliveries.c.channel,
            segment_deliveries.c.segment,
            segment_deliveries.c.language,
        )
        async with self.engine.connect() as conn:
            return [_segment(r) for r in (await conn.execute(q)).mappings().all()]

    async def replaced_by(self, seg: SegmentDelivery) -> str | None:
        """The partner id of the latest earlier version's request to the same segment in the same
        language that went out: what ``seg`` updates at the partner (None: nothing to update)."""
        t = segment_deliveries.c
        q = (
            sa.select(t.partner_id)
            .where(
                t.advisory_id == seg.advisory_id,
                t.version < seg.version,
                t.channel == seg.channel,
                t.segment == seg.segment,
                t.language == seg.language,
                t.status == Status.SENT.value,
            )
            .order_by(t.version.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            return (await conn.execute(q)).scalar()

    async def segment_sent(
        self, seg: SegmentDelivery, partner_id: str, targeted: int, replaces: str | None
    ) -> None:
        """The partner took the request. One it updates (``replaces``) is thereby withdrawn there:
        marked cancelled ("updated by vN") in the same transaction."""
        t = segment_deliveries.c
        at = now()
        async with self._begin() as conn:
            await conn.execute(
                sa.update(segment_deliveries)
                .where(t.id == seg.id, t.status == Status.PLANNED.value)
                .values(
                    status=Status.SENT.value,
                    partner_id=partner_id,
                    replaces=replaces,
                    targeted=_grown(t.targeted, targeted),
                    attempts=t.attempts + 1,
                    sent_at=at,
                    updated_at=at,
                )
            )
            if replaces is not None:
                await conn.execute(
                    sa.update(segment_deliveries)
                    .where(t.partner_id == replaces, t.status == Status.SENT.value)
                    .values(
                        status=Status.CANCELLED.value,
                        cancel="done",
                        reason=f"updated by v{seg.version}",
                        updated_at=at,
                    )
                )

    async def segment_ended(self, seg_id: str, status: Status, reason: str) -> None:
        """A planned segment request that will not go out: failed, cancelled or expired."""
        t = segment_deliveries.c
        async with self._begin() as conn:
            await conn.execute(
                sa.update(segment_deliveries)
                .where(t.id == seg_id, t.status == Status.PLANNED.value)
                .values(status=status.value, reason=_stored(reason), updated_at=now())
            )

    async def segment_retry(self, seg_id: str, reason: str) -> int:
        """An attempt that will be retried; returns the attempts made so far."""
        t = segment_deliveries.c
        async with self._begin() as conn:
            await conn.execute(
                sa.update(segment_deliveries)
                .where(t.id == seg_id, t.status == Status.PLANNED.value)
                .values(attempts=t.attempts + 1, reason=_stored(reason), updated_at=now())
            )
            return int((await conn.execute(sa.select(t.attempts).where(t.id == seg_id))).scalar() or 0)

    async def segments_to_cancel(self) -> list[SegmentDelivery]:
        """Requests the partner took whose advisory version was since cancelled or superseded, the
        partner not yet told; not those a later version's request will update instead."""
        t = segment_deliveries.c
        later = segment_deliveries.alias("later")
        q = (
            sa.select(segment_deliveries)
            .join(advisories, sa.and_(advisories.c.id == t.advisory_id, advisories.c.version == t.version))
            .where(
                t.status == Status.SENT.value,
                t.cancel.is_(None),
                advisories.c.state.in_([A.CANCELLED.value, A.SUPERSEDED.value]),
                ~sa.exists().where(
                    later.c.advisory_id == t.advisory_id,
                    later.c.version > t.version,
                    later.c.channel == t.channel,
                    later.c.segment == t.segment,
                    later.c.language == t.language,
                    later.c.status.in_([Status.PLANNED.value, Status.SENT.value]),
                    # a cancelled advisory's later version updates nothing: it is cancelled too
                    sa.exists().where(
                        advisories.c.id == later.c.advisory_id,
                        advisories.c.version == later.c.version,
                        advisories.c.state.in_([A.ACTIVE.value, A.COMPLETED.value, A.RECEIVED.value]),
                    ),
                ),
            )
        )
        async with self.engine.connect() as conn:
            return [_segment(r) for r in (await conn.execute(q)).mappings().all()]

    async def segment_cancelled(self, seg_id: str, reason: str, cancelled: int) -> None:
        """The partner took our cancel: what it had not yet delivered is ``cancelled``."""
        t = segment_deliveries.c
        async with self._begin() as conn:
            await conn.execute(
                sa.update(segment_deliveries)
                .where(t.id == seg_id, t.status == Status.SENT.value)
                .values(
                    status=Status.CANCELLED.value,
                    cancel="done",
                    reason=_stored(reason),
                    cancelled=_grown(t.cancelled, cancelled),
                    updated_at=now(),
                )
            )

    async def apply_segment_receipts(self, channel: str, found: Sequence[SegmentReceipt]) -> tuple[int, int]:
        """Aggregate receipts: each count only grows (receipts are cumulative, may come twice or out
        of order). Returns (applied, naming no segment request of ours)."""
        t = segment_deliveries.c
        applied = unknown = 0
        async with self._begin() as conn:
            for r in found:
                values: dict[str, Any] = {k: _grown(t[k], int(r.counts.get(k, 0))) for k in SEGMENT_COUNTS}
                if r.final:
                    values["final"] = True
                result = await conn.execute(
                    sa.update(segment_deliveries)
                    .where(t.id == r.key, t.channel == channel, t.status != Status.PLANNED.value)
                    .values(**values, updated_at=now())
                )
                if result.rowcount:
                    applied += 1
                else:
                    unknown += 1
        return applied, unknown

    async def segment_totals(self) -> dict[tuple[str, str], int]:
        """(channel, count name or "requests_<status>") -> total over every segment request: metrics."""
        t = segment_deliveries.c
        sums = [sa.func.coalesce(sa.func.sum(t[k]), 0) for k in SEGMENT_COUNTS]
        q = sa.select(t.channel, t.status, sa.func.count(), *sums).group_by(t.channel, t.status)
        out: dict[tuple[str, str], int] = defaultdict(int)
        async with self.engine.connect() as conn:
            for channel, status, n, *counts in (await conn.execute(q)).all():
                out[(channel, f"requests_{status}")] += int(n)
                for k, v in zip(SEGMENT_COUNTS, counts, strict=True):
                    out[(channel, k)] += int(v)
        return dict(out)
