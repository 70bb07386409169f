"""Receipts: a partner's word applied to its deliveries (rank-guarded), held while the partner id
it names is not recorded yet (migration 0010)."""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.models import Status, aware, now
from gateway.schema import deliveries, held_receipts, partner_refs
from gateway.store.base import among
from gateway.store.deliveries import WENT_OUT, WITHDRAWN, DeliveriesStore, Outcome, _by_status, _sqlite_record
from gateway.store.sqlite import _RECEIPTS, _marks, _sqlite_all, _sqlite_insert, _sqlite_time, working_for

_RECEIPT_COLUMNS = ("delivery_id", "channel", "status", "partner_id", "received_at")
_SQLITE_RECEIPT = (f"INSERT INTO receipts ({', '.join(_RECEIPT_COLUMNS)})", "")
# PostgreSQL: a batch of receipts logged by one statement from arrays (executemany is a statement a
# row there, and a many-VALUES insert is compiled for each batch)
_PG_RECEIPTS = sa.text(
    f"INSERT INTO receipts ({', '.join(_RECEIPT_COLUMNS)}) "  # noqa: S608 -- constant column names only
    "SELECT r.d, CAST(:channel AS varchar), r.s, r.p, CAST(:at AS timestamptz) FROM unnest("
    "CAST(:ids AS varchar[]), CAST(:statuses AS varchar[]), CAST(:partners AS varchar[])) AS r(d, s, p)"
)


@dataclass(frozen=True, slots=True)
class AppliedReceipts:
    moved: list[Outcome]  # receipts that moved their delivery forward, in arrival order
    unknown: list[Outcome]  # receipts naming no delivery of ours (not stored), given up
    unchanged: int  # duplicates and late receipts: stored, changed nothing
    # seconds from sent to the receipt, for each delivery these receipts first reached (delivered
    # or read): the delivery latency
    reached_after_s: list[float] = dataclasses.field(default_factory=list)
    # receipts naming a partner id not recorded yet: held (``held_receipts``), applied when it is
    held: int = 0


def _last_per_delivery(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """The furthest move of each delivery (one UPDATE per delivery, not one per receipt)."""
    last: dict[str, Outcome] = {}
    for o in outcomes:
        last[o.delivery_id] = o
    return list(last.values())


@dataclass(frozen=True, slots=True)
class _Receipted:
    """What a batch of receipts did, decided from the ranks their deliveries had."""

    known: list[Outcome]  # receipts naming a delivery of ours, in arrival order
    unknown: list[Outcome]
    moved: list[Outcome]  # the known ones that moved their delivery forward
    before: dict[str, int]  # each named delivery's rank before the batch
    sent_s: dict[str, float]  # seconds from each named delivery's send to these receipts
    held: int = 0  # receipts held for a partner id not recorded yet (not in ``unknown``)

    @classmethod
    def of(cls, items: Sequence[Outcome], found: Iterable[tuple[str, int, float | None, str]]) -> _Receipted:
        """``found``: (delivery id, rank, seconds since it was sent or None, status) of the deliveries
        the receipts name."""
        ranks: dict[str, int] = {}
        sent_s: dict[str, float] = {}
        withdrawn: set[str] = set()
        for i, rank, seconds, status in found:
            ranks[i] = rank
            if seconds is not None:
                sent_s[i] = seconds
            if status in WITHDRAWN:
                withdrawn.add(i)
        before = dict(ranks)
        known = [o for o in items if o.delivery_id in ranks]
        moved: list[Outcome] = []
        for o in known:  # in arrival order: "read" after "delivered" moves twice
            went_out = o.delivery_id in withdrawn and o.status in WENT_OUT  # see _moved
            if ranks[o.delivery_id] < o.status.rank or went_out:
                ranks[o.delivery_id] = o.status.rank
                withdrawn.discard(o.delivery_id)
                moved.append(o)
        return cls(known, [o for o in items if o.delivery_id not in ranks], moved, before, sent_s)

    def result(self, at: datetime) -> AppliedReceipts:
        reached = Status.DELIVERED.rank
        first_reached = {
            o.delivery_id
            for o in self.moved
            if o.status in (Status.DELIVERED, Status.READ)
            and self.before[o.delivery_id] < reached
            and o.delivery_id in self.sent_s
        }
        latencies = [self.sent_s[i] for i in first_reached]
        return AppliedReceipts(
            self.moved, self.unknown, len(self.known) - len(self.moved), latencies, self.held
        )

    def holding(self, kept: Sequence[Outcome]) -> _Receipted:
        """These of the unknown receipts are held: the rest are given up."""
        held = {id(o) for o in kept}
        return dataclasses.replace(
            self, unknown=[o for o in self.unknown if id(o) not in held], held=len(kept)
        )


def _holdable(o: Outcome) -> bool:
    """A receipt that names a partner id and no delivery: its send's answer may not be recorded yet."""
    return not o.delivery_id and bool(o.partner_id)


def _matched(items: Sequence[Outcome], by_partner: Mapping[str, str]) -> list[Outcome]:
    """Receipts without a delivery id given the one their partner id names (or "": none)."""
    return [
        o
        if o.delivery_id
        else Outcome(by_partner.get(o.partner_id or "", ""), o.status, o.partner_id, o.reason)
        for o in items
    ]


def _sqlite_receipts(
    db: sqlite3.Connection, channel: str, items: Sequence[Outcome], at: datetime
) -> _Receipted:
    """Store.apply_receipts on SQLite's writer connection, as one transaction."""
    unmatched = [o.partner_id for o in items if not o.delivery_id and o.partner_id]
    if unmatched:
        rest = f"FROM partner_refs WHERE channel = ? AND partner_id IN ({_marks(len(unmatched))})"
        items = _matched(items, dict(_sqlite_all(db, "partner_id, delivery_id", rest, [channel, *unmatched])))
    ids = sorted({o.delivery_id for o in items if o.delivery_id})
    rest = f"FROM deliveries WHERE id IN ({_marks(len(ids))})"
    stamp = _sqlite_time(at)
    # the seconds since each was sent computed by SQLite: parsing every sent_at in Python held the
    # interpreter's lock in the writer's thread (12 % of its share of it)
    since_sent = "(julianday(?) - julianday(sent_at)) * 86400.0"
    found = _sqlite_all(db, f"id, rank, {since_sent}, status", rest, [stamp, *ids])
    applied = _Receipted.of(items, cast(list[tuple[str, int, float | None, str]], found))  # rows as lists
    _sqlite_record(db, _by_status(_last_per_delivery(applied.moved)), at, attempted=False, receipt=True)
    if applied.known:
        rows = [(o.delivery_id, channel, o.status.value, o.partner_id, stamp) for o in applied.known]
        _sqlite_insert(db, _SQLITE_RECEIPT, rows)
    return applied


_HELD_COLUMNS = ("channel", "partner_id", "status", "received_at")
_SQLITE_HOLD = (f"INSERT INTO held_receipts ({', '.join(_HELD_COLUMNS)})", " ON CONFLICT DO NOTHING")


def _sqlite_receipts_holding(
    db: sqlite3.Connection, channel: str, items: Sequence[Outcome], at: datetime
) -> _Receipted:
    """``_sqlite_receipts``, and the receipts naming a partner id no delivery has yet held."""
    applied = _sqlite_receipts(db, channel, items, at)
    kept = [o for o in applied.unknown if _holdable(o)]
    if kept:
        stamp = _sqlite_time(at)
        _sqlite_insert(db, _SQLITE_HOLD, [(channel, o.partner_id, o.status.value, stamp) for o in kept])
    return applied.holding(kept)


def _sqlite_held(
    db: sqlite3.Connection, at: datetime, give_up_before: datetime, limit: int
) -> list[tuple[str, _Receipted]]:
    """Store.apply_held on SQLite's writer connection, as one transaction."""
    columns = ", ".join(_HELD_COLUMNS)
    inner = f"SELECT rowid AS r, {columns} FROM held_receipts ORDER BY received_at LIMIT ?"  # noqa: S608
    rows = _sqlite_all(db, f"r, {columns}", f"FROM ({inner})", [limit])
    if not rows:
        return []
    delete = f"DELETE FROM held_receipts WHERE rowid IN ({_marks(len(rows))})"  # noqa: S608
    db.execute(delete, [r[0] for r in rows])
    cutoff = _sqlite_time(give_up_before)
    out = []
    for channel, group in itertools.groupby(sorted(rows, key=lambda r: r[1]), key=lambda r: r[1]):
        since = {(p, st): t for _, _, p, st, t in group}
        applied = _sqlite_receipts(db, channel, [Outcome("", Status(st), p) for p, st in since], at)
        kept = [o for o in applied.unknown if since[(o.partner_id, o.status.value)] >= cutoff]
        rows_kept = [
            (channel, o.partner_id, o.status.value, since[(o.partner_id, o.status.value)]) for o in kept
        ]
        if rows_kept:
            _sqlite_insert(db, _SQLITE_HOLD, rows_kept)
        out.append((channel, applied.holding(kept)))
    return out


class ReceiptsStore(DeliveriesStore):
    """Receipts applied to their deliveries, and the held ones tried again."""

    async def apply_receipts(self, channel: str, items: Sequence[Outcome]) -> AppliedReceipts:
        """Record receipts and move their deliveries forward. A receipt without a delivery id is
        matched by the partner's message id. Returns which receipts changed a delivery (the only ones
        worth an event), which named no delivery we know, and how many changed nothing."""
        if not items:
            return AppliedReceipts([], [], 0)
        at = now()
        if self._writer is not None:
            with working_for(_RECEIPTS):
                work = partial(_sqlite_receipts_holding, channel=channel, items=items, at=at)
                applied = await self._write(work)
        else:
            async with self._begin() as conn:
                applied = await self._receipts_in(conn, channel, items, at)
                kept = [o for o in applied.unknown if _holdable(o)]
                await self._hold_in(conn, channel, [(o, at) for o in kept])
                applied = applied.holding(kept)
        return applied.result(at)

    async def apply_held(
        self, give_up_before: datetime, limit: int = 1000
    ) -> list[tuple[str, AppliedReceipts]]:
        """Held receipts (``apply_receipts``: they named a partner id no delivery had yet) tried
        again, the oldest ``limit``: each now matched is applied; each still unmatched stays held,
        unless it came before ``give_up_before`` (then it is given up: ``unknown``). Per channel."""
        at = now()
        if self._writer is not None:
            with working_for(_RECEIPTS):
                work = partial(_sqlite_held, at=at, give_up_before=give_up_before, limit=limit)
                done = await self._write(work)
        else:
            async with self._begin() as conn:
                done = await self._held_in(conn, at, give_up_before, limit)
        return [(channel, applied.result(at)) for channel, applied in done]

    async def _held_in(
        self, conn: AsyncConnection, at: datetime, give_up_before: datetime, limit: int
    ) -> list[tuple[str, _Receipted]]:
        t = held_receipts.c
        q = sa.select(t.channel, t.partner_id, t.status, t.received_at).order_by(t.received_at).limit(limit)
        rows = (await conn.execute(q.with_for_update(skip_locked=True))).all()  # instances take turns
        if not rows:
            return []
        keys = [(str(c), str(p), str(st)) for c, p, st, _ in rows]
        await conn.execute(
            sa.delete(held_receipts).where(sa.tuple_(t.channel, t.partner_id, t.status).in_(keys))
        )
        out = []
        for channel, group in itertools.groupby(sorted(rows, key=lambda r: r[0]), key=lambda r: r[0]):
            since = {(str(p), str(st)): aware(r_at) for _, p, st, r_at in group}
            items = [Outcome("", Status(st), p) for p, st in since]
            applied = await self._receipts_in(conn, str(channel), items, at)
            kept = [
                o for o in applied.unknown if since[(o.partner_id or "", o.status.value)] >= give_up_before
            ]
            await self._hold_in(
                conn, str(channel), [(o, since[(o.partner_id or "", o.status.value)]) for o in kept]
            )
            out.append((str(channel), applied.holding(kept)))
        return out

    async def _hold_in(
        self, conn: AsyncConnection, channel: str, kept: Sequence[tuple[Outcome, datetime]]
    ) -> None:
        if kept:
            rows = [
                {"channel": channel, "partner_id": o.partner_id, "status": o.status.value, "received_at": at}
                for o, at in kept
            ]
            await conn.execute(self._insert(held_receipts).on_conflict_do_nothing(), rows)

    async def _receipts_in(
        self, conn: AsyncConnection, channel: str, items: Sequence[Outcome], at: datetime
    ) -> _Receipted:
        unmatched = [o.partner_id for o in items if not o.delivery_id and o.partner_id]
        if unmatched:
            q = sa.select(partner_refs.c.partner_id, partner_refs.c.delivery_id).where(
                partner_refs.c.channel == channel, among(partner_refs.c.partner_id, unmatched, self._dialect)
            )
            items = _matched(items, {str(p): str(i) for p, i in (await conn.execute(q)).all()})
        ranks_q = (
            sa.select(deliveries.c.id, deliveries.c.rank, deliveries.c.sent_at, deliveries.c.status)
            .where(
                among(deliveries.c.id, sorted({o.delivery_id for o in items if o.delivery_id}), self._dialect)
            )
            .order_by(deliveries.c.id)
            .with_for_update()  # PostgreSQL: concurrent batches for one delivery take turns
        )
        found = [
            (str(i), int(r), (at - aware(t)).total_seconds() if t is not None else None, str(st))
            for i, r, t, st in (await conn.execute(ranks_q))
        ]
        applied = _Receipted.of(items, found)
        by_status = _by_status(_last_per_delivery(applied.moved))
        await self._record_in(conn, by_status, at, attempted=False, locked=True, receipt=True)
        if applied.known:
            known = applied.known
            await conn.execute(
                _PG_RECEIPTS,
                {
                    "ids": [o.delivery_id for o in known],
                    "statuses": [o.status.value for o in known],
                    "partners": [o.partner_id for o in known],
                    "channel": channel,
                    "at": at,
                },
            )
        return applied
