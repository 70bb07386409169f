"""Deliveries: made in planning order (their ids begin with their number), moved only forward
(``Status.rank``), claimed by an instance for partners without idempotency keys."""

from __future__ import annotations

import functools
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.lifecycle import A
from gateway.logging import mask_pii_text
from gateway.models import PENDING, Contact, Status, aware, delivery_hash, delivery_id, now
from gateway.schema import (
    FAILED_ROWS,
    PENDING_ROWS,
    SENT_ROWS,
    UNCONFIRMED_ROWS,
    advisories,
    deliveries,
    partner_refs,
    recipients,
)
from gateway.store.base import StoreBase, among
from gateway.store.leases import _SQLITE_CLAIM, _claimed
from gateway.store.recipients import _CONTACT
from gateway.store.sqlite import (
    _SQLITE_ROWS,
    _lists,
    _marks,
    _sqlite_all,
    _sqlite_insert,
    _sqlite_time,
    _sqlite_values,
)

# the partial indexes' conditions as they are written (gateway/schema.py): a query that repeats one
# may read its index
_IS_PENDING = sa.text(PENDING_ROWS)
_IS_SENT = sa.text(SENT_ROWS)
_IS_UNCONFIRMED = sa.text(UNCONFIRMED_ROWS)
_IS_FAILED = sa.text(FAILED_ROWS)
WITHDRAWN = (Status.CANCELLED, Status.EXPIRED)
# what a receipt says of a message that reached the partner: it may move a withdrawn delivery (_moved)
WENT_OUT = frozenset({Status.DELIVERED, Status.READ, Status.FAILED})


def _transition(
    conn: sa.Connection,
    where: tuple[sa.ColumnElement[bool] | sa.TextClause, ...],
    status: Status,
    reason: str | None,
) -> int:
    """Move every delivery matching ``where`` to ``status`` with ``reason``; returns how many moved."""
    result = conn.execute(
        sa.update(deliveries)
        .where(*where)
        .values(status=status.value, rank=status.rank, reason=reason, updated_at=now())
    )
    return int(result.rowcount)


class WorkItem(NamedTuple):
    """A pending delivery joined with what rendering and the adapter need."""

    delivery_id: str
    channel: str
    attempts: int
    language: str  # chosen at planning ("" if it was not known then)
    recipient: Contact


class Planned(NamedTuple):
    """A delivery to make: one recipient on one channel of an advisory version, in a status
    (queued, or skipped with the reason), in the language it will be rendered in."""

    recipient_id: str
    channel: str
    status: Status
    language: str = ""
    reason: str | None = None


# the columns a delivery is made with (and their PostgreSQL types), besides updated_at
_INSERT_COLUMNS = (
    ("seq", "bigint"),
    ("id", "varchar"),
    ("advisory_id", "varchar"),
    ("version", "int"),
    ("recipient_id", "varchar"),
    ("channel", "varchar"),
    ("language", "varchar"),
    ("status", "varchar"),
    ("rank", "smallint"),
    ("reason", "varchar"),
)


def _hashes(advisory_id: str, version: int, planned: Sequence[Planned]) -> list[str]:
    """What each delivery is, hashed: the part of its id after its number (models.delivery_id)."""
    return [delivery_hash(advisory_id, version, p.recipient_id, p.channel) for p in planned]


def _made(
    seqs: Iterable[int], hashes: Sequence[str], advisory_id: str, version: int, planned: Sequence[Planned]
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The ids of ``planned`` numbered ``seqs``, and their rows in the order of _INSERT_COLUMNS."""
    ids = [delivery_id(seq, h) for seq, h in zip(seqs, hashes, strict=True)]
    rows = [
        (
            seq,
            i,
            advisory_id,
            version,
            p.recipient_id,
            p.channel,
            p.language,
            p.status.value,
            p.status.rank,
            p.reason,
        )
        for seq, i, p in zip(seqs, ids, planned, strict=True)
    ]
    return ids, rows


_PG_INSERT = sa.text(
    "INSERT INTO deliveries ("  # noqa: S608 -- constant column names only
    + ", ".join(n for n, _ in _INSERT_COLUMNS)
    + ", updated_at) SELECT *, CAST(:at AS timestamptz) FROM unnest("
    + ", ".join(f"CAST(:{n} AS {t}[])" for n, t in _INSERT_COLUMNS)
    + ") ON CONFLICT DO NOTHING"
)
_PG_SEQS = sa.text("SELECT nextval(pg_get_serial_sequence('deliveries', 'seq')) FROM generate_series(1, :n)")


_SQLITE_INSERT = (
    "INSERT INTO deliveries (" + ", ".join(n for n, _ in _INSERT_COLUMNS) + ", updated_at)",
    " ON CONFLICT DO NOTHING",
)


def _sqlite_make(
    db: sqlite3.Connection,
    advisory_id: str,
    version: int,
    planned: Sequence[Planned],
    hashes: Sequence[str],
    stamp: str,
) -> list[str]:
    """(In SQLite's writer.) Make the deliveries ``planned`` — numbered after the last one made —
    and return their ids: those made now, and for any made before (a page planned again) theirs."""
    (last,) = db.execute("SELECT coalesce(max(seq), 0) FROM deliveries").fetchone()
    ids, rows = _made(range(last + 1, last + 1 + len(planned)), hashes, advisory_id, version, planned)
    if _sqlite_insert(db, _SQLITE_INSERT, [(*row, stamp) for row in rows]) == len(rows):
        return ids
    made: dict[tuple[str, str], str] = {}
    recipients_ = sorted({p.recipient_id for p in planned})
    for start in range(0, len(recipients_), _SQLITE_ROWS):
        part = recipients_[start : start + _SQLITE_ROWS]
        rest = (
            f"FROM deliveries WHERE advisory_id = ? AND version = ? AND recipient_id IN ({_marks(len(part))})"
        )
        made.update(
            ((r, c), i)
            for r, c, i in _sqlite_all(db, "recipient_id, channel, id", rest, [advisory_id, version, *part])
        )
    return [made[(p.recipient_id, p.channel)] for p in planned]


def _moved(
    status: Status,
    attempted: bool,
    id_: sa.ColumnElement[Any],
    partner_id: sa.ColumnElement[Any],
    reason: sa.ColumnElement[Any],
    at: sa.ColumnElement[Any],
    receipt: bool = False,
) -> sa.Update:
    """The UPDATE of the delivery ``id_`` to ``status``, only forward: a write that would move one
    backwards changes nothing. ``attempted``: the partner's answer to a request; ``receipt``: the
    partner's receipt — both say the message went out, so both may move a withdrawn delivery."""
    t = deliveries.c
    values: dict[str, Any] = {
        "status": status.value,
        "rank": status.rank,
        "updated_at": at,
        "partner_id": sa.func.coalesce(partner_id, t.partner_id),
        "reason": reason,
    }
    if attempted:
        values["attempts"] = t.attempts + 1
    if status is Status.SENT:
        values["sent_at"] = at
    forward: sa.ColumnElement[bool] = t.rank < status.rank
    if status in WITHDRAWN:
        # cancel and expiry take only what has not gone out: never a sent or delivered message
        forward = sa.or_(*(t.status == s.value for s in PENDING))
    elif attempted or (receipt and status in WENT_OUT):
        # the partner's answer to a request that was already on its way when a cancel, an update
        # or expiry withdrew the delivery — or its receipt, which can be written first (receipts
        # take their write turn ahead of bulk results): the message went out, and the store says so
        forward = sa.or_(forward, *(t.status == s.value for s in WITHDRAWN))
    return sa.update(deliveries).where(t.id == id_, forward).values(**values)


_AT = "'__at__'"  # where a move's time goes in _move_parts' text
_DIALECTS: dict[str, sa.Dialect] = {
    "sqlite": sqlite.dialect(),
    "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
}


@functools.cache
def _move_parts(dialect: str, status: Status, attempted: bool, receipt: bool = False) -> tuple[str, str]:
    """``_moved`` for a batch, as the dialect's text once, in two parts: the batch's rows, named
    ``moved`` with columns ``column1`` (id), ``column2`` (partner id) and ``column3`` (reason), go
    between them; the constants are written in, the time replaces ``_AT``."""
    column = sa.literal_column
    statement = _moved(
        status,
        attempted,
        column("moved.column1"),
        column("moved.column2"),
        column("moved.column3"),
        column(_AT),
        receipt,
    )
    text = str(statement.compile(dialect=_DIALECTS[dialect], compile_kwargs={"literal_binds": True}))
    head, where = text.split(" WHERE ", 1)
    return head, where


@functools.cache
def _pg_move(status: Status, attempted: bool, receipt: bool = False) -> sa.TextClause:
    """``_moved`` for a batch on PostgreSQL, as text once: the batch comes as three arrays (ids,
    partner ids, reasons) and the time, so every batch runs the same statement, prepared once.
    Built as a VALUES list of 500 rows, it was compiled by SQLAlchemy for each batch: a fifth of the
    event loop in a broadcast on PostgreSQL."""
    head, where = _move_parts("postgresql", status, attempted, receipt)
    batch = (
        "unnest(CAST(:ids AS varchar[]), CAST(:partners AS varchar[]), CAST(:reasons AS varchar[])) "
        "AS moved(column1, column2, column3)"
    )
    return sa.text(f"{head.replace(_AT, 'CAST(:at AS timestamptz)')} FROM {batch} WHERE {where}")


Moves = dict[Status, list[tuple[str, str | None, str | None]]]  # (delivery id, partner id, reason)


def _by_status(outcomes: Iterable[Outcome]) -> Moves:
    """The moves of ``outcomes`` by their status. A reason is stored with phone numbers and e-mail
    addresses masked as the logs have them: it is often a partner's own words ("550 5.1.1
    <aigerim@example.kz>: no such mailbox"), and it goes on to the delivery events, the status API and
    the console, which name no recipient (docs/delivery-events.md)."""
    by_status: Moves = defaultdict(list)
    for o in outcomes:
        by_status[o.status].append((o.delivery_id, o.partner_id, o.reason and mask_pii_text(o.reason)))
    return by_status


def _sqlite_record(
    db: sqlite3.Connection, by_status: Moves, at: datetime, attempted: bool, receipt: bool = False
) -> int:
    """Store.record's moves on SQLite's writer connection, a statement per status and up to
    ``_SQLITE_ROWS`` deliveries; returns rows moved."""
    stamp = f"'{_sqlite_time(at)}'"  # digits and separators only
    moved = 0
    for status, params in by_status.items():
        head, where = _move_parts("sqlite", status, attempted, receipt)  # FROM (VALUES …) AS moved
        head = head.replace(_AT, stamp)
        for start in range(0, len(params), _SQLITE_ROWS):
            part = params[start : start + _SQLITE_ROWS]
            update = _sqlite_values(f"{head} FROM (", 3, len(part), f") AS moved WHERE {where}")
            moved += db.execute(update, [v for row in part for v in row]).rowcount
    return moved


_SQLITE_REFS = ("INSERT INTO partner_refs (channel, partner_id, delivery_id)", " ON CONFLICT DO NOTHING")


class Outcome(NamedTuple):
    delivery_id: str
    status: Status
    partner_id: str | None = None
    reason: str | None = None


def _pending_work() -> sa.Select[Any]:
    """The pending deliveries (of ids given by a ``where``) with their recipients: ``WorkItem``'s columns."""
    t = deliveries.c
    return (
        sa.select(t.id, t.channel, t.attempts, t.language, *_CONTACT)
        .join(recipients, recipients.c.id == t.recipient_id)
        .where(_IS_PENDING)
    )


@functools.cache
def _sqlite_pending_text() -> str:
    """``_pending_work`` for any number of ids, as SQLite text once (as one row of JSON: _lists); the
    ids' marks go where ``__[POSTCOMPILE_ids]`` is."""
    sub = _pending_work().where(deliveries.c.id.in_(sa.bindparam("ids", expanding=True))).subquery()
    statement = sa.select(sa.func.json_group_array(sa.func.json_array(*sub.c)))
    return str(statement.compile(dialect=sqlite.dialect()))


def _sqlite_pending_work(conn: sa.Connection, ids: list[str]) -> list[list[Any]]:
    """``_pending_work`` of ``ids`` on a SQLite reader, as text made once: through SQLAlchemy's
    statement, expanded for 500 ids each time, a chunk's read took 1.6 ms of Python instead of 0.8 ms
    — the interpreter's lock, which the writer's thread waits for."""
    text = _sqlite_pending_text().replace("__[POSTCOMPILE_ids]", _marks(len(ids)))
    rows: list[list[Any]] = orjson.loads(conn.exec_driver_sql(text, tuple(ids)).scalar_one())
    return rows


class DeliveriesStore(StoreBase):
    """Deliveries: made, sent, moved forward, claimed, swept and cascaded."""

    async def insert_planned(
        self,
        advisory_id: str,
        version: int,
        planned: Sequence[Planned],
        planner: str,
        lease_s: float,
        after: str,
    ) -> list[str] | None:
        """Make a page of deliveries, in one transaction with taking (or renewing) the lease to plan
        the advisory version: only if ``planner`` may plan it and its cursor is still ``after`` (no
        other instance planned further meanwhile). Returns their ids (``insert_deliveries``); None,
        and nothing written, if the lease was not taken."""
        at = now()
        until = at + timedelta(seconds=lease_s)
        hashes = _hashes(advisory_id, version, planned)  # before the write turn: the turn is the bottleneck
        if self._writer is not None:
            stamp = _sqlite_time(at)
            claim = {
                "id": advisory_id,
                "version": version,
                "after": after,
                "planner": planner,
                "at": stamp,
                "until": _sqlite_time(until),
            }

            def page(db: sqlite3.Connection) -> list[str] | None:
                if not db.execute(_SQLITE_CLAIM, claim).rowcount:
                    return None
                return _sqlite_make(db, advisory_id, version, planned, hashes, stamp) if planned else []

            return await self._write(page)
        async with self._begin() as conn:
            claimed = await conn.execute(_claimed(advisory_id, version, after, planner, at, until))
            if not claimed.rowcount:
                return None
            ids = await self._make_in(conn, advisory_id, version, planned, hashes, at)
        if planned:
            await self._analyze_when_grown(len(planned))
        return ids

    # -- deliveries ---------------------------------------------------------------------------

    async def insert_deliveries(
        self, advisory_id: str, version: int, planned: Sequence[Planned]
    ) -> list[str]:
        """Make deliveries of an advisory version; returns their ids, in the order of ``planned``.
        One made already (a page planned again) is left as it is, and its id is returned: a
        delivery is made once, whatever replays it."""
        if not planned:
            return []
        hashes = _hashes(advisory_id, version, planned)  # before the write turn: the turn is the bottleneck
        if self._writer is not None:
            stamp = _sqlite_time(now())
            return await self._write(
                lambda db: _sqlite_make(db, advisory_id, version, planned, hashes, stamp)
            )
        async with self._begin() as conn:
            ids = await self._make_in(conn, advisory_id, version, planned, hashes, now())
        await self._analyze_when_grown(len(planned))
        return ids

    async def _make_in(
        self,
        conn: AsyncConnection,
        advisory_id: str,
        version: int,
        planned: Sequence[Planned],
        hashes: Sequence[str],
        at: datetime,
    ) -> list[str]:
        """PostgreSQL's ``_sqlite_make``: numbers from the table's sequence, and one INSERT … SELECT
        FROM unnest(arrays) (executemany is a statement per row there): the statement triggers run
        once per page, and nothing large is compiled."""
        if not planned:
            return []
        seqs = [int(n) for n in (await conn.execute(_PG_SEQS, {"n": len(planned)})).scalars()]
        ids, rows = _made(seqs, hashes, advisory_id, version, planned)
        columns = {name: [row[i] for row in rows] for i, (name, _) in enumerate(_INSERT_COLUMNS)}
        if (await conn.execute(_PG_INSERT, {**columns, "at": at})).rowcount == len(rows):
            return ids
        t = deliveries.c
        q = sa.select(t.recipient_id, t.channel, t.id).where(
            t.advisory_id == advisory_id,
            t.version == version,
            t.recipient_id.in_(sorted({p.recipient_id for p in planned})),
        )
        made = {(str(r), str(c)): str(i) for r, c, i in (await conn.execute(q)).all()}
        return [made[(p.recipient_id, p.channel)] for p in planned]

    async def _analyze_when_grown(self, inserted: int) -> None:
        """PostgreSQL: ANALYZE deliveries (and the outbox) each time this process has doubled what it
        inserted since the last time (at least 5,000 rows). A broadcast fills the table faster than
        autovacuum looks (a minute): planned on the statistics of an empty table, a lookup of 500
        ids by primary key became a sequential scan of every delivery, and a broadcast of 100,000
        slowed to 470 a second. About twenty analyzes over ten million rows, each a bounded sample."""
        self._inserted += inserted
        if self._inserted < max(5_000, 2 * self._analyzed_at):
            return
        self._analyzed_at = self._inserted
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("ANALYZE deliveries, delivery_events, delivery_count_deltas"))
            await conn.commit()

    async def _lock(self, conn: AsyncConnection, ids: Sequence[str]) -> None:
        """PostgreSQL: lock these deliveries in id order before an UPDATE that would lock them in
        the order it finds them. Every writer of several deliveries locks in id order, so two
        transactions never wait on each other in a circle (PostgreSQL aborts one as a deadlock)."""
        if self._dialect == "postgresql":
            q = sa.select(deliveries.c.id).where(among(deliveries.c.id, ids, self._dialect))
            await conn.execute(q.order_by(deliveries.c.id).with_for_update())

    async def mark_queued(self, ids: Sequence[str]) -> None:
        """Planned deliveries whose chunk is on the topic: one UPDATE, not one per row."""
        if not ids:
            return
        planned = (deliveries.c.id.in_(list(ids)), deliveries.c.status == Status.PLANNED.value)
        async with self._begin() as conn:
            await self._lock(conn, ids)
            await conn.run_sync(_transition, planned, Status.QUEUED, None)

    async def pending_work(
        self, ids: Sequence[str], claim: str | None = None, lease_s: float = 60.0
    ) -> list[WorkItem]:
        """The deliveries among ``ids`` that are still to be sent, with their recipients. With
        ``claim`` (an instance's name): only those it could claim for ``lease_s`` — none another
        instance holds now — so that two instances never send one delivery at once."""
        t = deliveries.c
        if claim is None and self._readers is not None:  # every chunk of a broadcast: _sqlite_pending_work
            rows = await self._read(partial(_sqlite_pending_work, ids=list(ids)))
        elif claim is None:
            rows = await self._read(partial(_lists, q=_pending_work().where(among(t.id, ids, self._dialect))))
        else:
            at = now()
            async with self._begin() as conn:
                await self._lock(conn, ids)
                await conn.execute(
                    sa.update(deliveries)
                    .where(
                        among(t.id, ids, self._dialect),
                        _IS_PENDING,
                        sa.or_(t.claimed_by.is_(None), t.claimed_by == claim, t.claimed_until < at),
                    )
                    .values(claimed_by=claim, claimed_until=at + timedelta(seconds=lease_s))
                )
                mine = _pending_work().where(among(t.id, ids, self._dialect), t.claimed_by == claim)
                rows = await conn.run_sync(_lists, mine)
        return [WorkItem(r[0], r[1], r[2], r[3], Contact(*r[4:])) for r in rows]

    async def renew_claims(self, ids: Sequence[str], claim: str, lease_s: float) -> None:
        """Extend ``claim``'s hold on those of ``ids`` it still holds and that are still pending."""
        t = deliveries.c
        async with self._begin() as conn:
            await self._lock(conn, ids)  # in id order, as every writer of several deliveries
            await conn.execute(
                sa.update(deliveries)
                .where(among(t.id, ids, self._dialect), t.claimed_by == claim, _IS_PENDING)
                .values(claimed_until=now() + timedelta(seconds=lease_s))
            )

    async def record(
        self, outcomes: Iterable[Outcome], attempted: bool = False, refs_channel: str | None = None
    ) -> int:
        """Move deliveries forward; a write that would move one backwards is ignored. Returns rows
        moved. ``refs_channel``: the partner ids of the sent ones go into ``partner_refs`` under this
        channel, in the same transaction (a channel whose receipts name nothing else)."""
        at = now()
        by_status = _by_status(outcomes)
        refs = (
            [(refs_channel, p, i) for i, p, _ in by_status.get(Status.SENT, ()) if p] if refs_channel else []
        )
        if self._writer is not None:

            def work(db: sqlite3.Connection) -> int:
                if refs:
                    _sqlite_insert(db, _SQLITE_REFS, refs)
                return _sqlite_record(db, by_status, at, attempted)

            return await self._write(work)
        async with self._begin() as conn:
            if refs:
                stmt = postgresql.insert(partner_refs).on_conflict_do_nothing()
                await conn.execute(
                    stmt, [dict(zip(("channel", "partner_id", "delivery_id"), r, strict=True)) for r in refs]
                )
            return await self._record_in(conn, by_status, at, attempted)

    async def _record_in(
        self,
        conn: AsyncConnection,
        by_status: Moves,
        at: datetime,
        attempted: bool,
        locked: bool = False,
        receipt: bool = False,
    ) -> int:
        """PostgreSQL. ``locked``: the caller holds these rows already (locked in id order)."""
        moved = 0
        if not locked:  # PostgreSQL's UPDATE … FROM VALUES locks in join order: id order first
            await self._lock(conn, [p[0] for params in by_status.values() for p in params])
        for status, params in by_status.items():
            moved += await self._move(conn, status, params, at, attempted, receipt)
        return moved

    async def _move(
        self,
        conn: AsyncConnection,
        status: Status,
        params: list[tuple[str, str | None, str | None]],
        at: datetime,
        attempted: bool,
        receipt: bool = False,
    ) -> int:
        """PostgreSQL: one statement for the batch (not one per row, as executemany is there): its
        statement triggers (the counters, the events) run once per batch."""
        ids, partners, reasons = (
            (list(column) for column in zip(*params, strict=True)) if params else ([], [], [])
        )
        moved = await conn.execute(
            _pg_move(status, attempted, receipt),
            {"ids": ids, "partners": partners, "reasons": reasons, "at": at},
        )
        return int(moved.rowcount)

    async def note_retry(self, ids: Sequence[str], reason: str) -> None:
        """Count an attempt that will be retried; the status stays pending."""
        async with self._begin() as conn:
            await self._lock(conn, ids)
            await conn.execute(
                sa.update(deliveries)
                .where(deliveries.c.id.in_(list(ids)), _IS_PENDING)
                .values(attempts=deliveries.c.attempts + 1, reason=reason, updated_at=now())
            )

    async def expire_pending(self, at: datetime) -> int:
        """Deliveries not yet sent whose advisory has expired become ``expired``; returns how many.
        The expired versions that still have pending deliveries are found first (a look at the
        pending index for each expired version), then each one's pending deliveries are moved."""
        t = deliveries.c
        has_pending = (
            sa.select(sa.literal(1))
            .select_from(deliveries)
            .where(t.advisory_id == advisories.c.id, t.version == advisories.c.version, _IS_PENDING)
            .exists()
        )
        q = sa.select(advisories.c.id, advisories.c.version).where(advisories.c.expires_at <= at, has_pending)

        def work(conn: sa.Connection) -> int:
            moved = 0
            for advisory_id, version in conn.execute(q).all():
                pending = (t.advisory_id == advisory_id, t.version == version, _IS_PENDING)
                moved += _transition(conn, pending, Status.EXPIRED, "advisory expired")
            return moved

        return await self._transact(work)

    async def mark_unknown(self, sent_before: datetime) -> int:
        """Deliveries ``sent`` before ``sent_before`` with no receipt since become ``unknown``."""
        silent = (_IS_SENT, deliveries.c.sent_at <= sent_before)
        return await self._transact(
            lambda conn: _transition(conn, silent, Status.UNKNOWN, "no receipt in time")
        )

    async def requeue_failed(
        self, advisory_id: str, channel: str | None, limit: int
    ) -> list[tuple[int, str, str]]:
        """Failed deliveries of an advisory (optionally one channel) back to ``queued`` with attempts
        reset: the one move backwards, on an operator's word. Returns (version, channel, id) of each."""
        q = sa.select(deliveries.c.version, deliveries.c.channel, deliveries.c.id).where(
            deliveries.c.advisory_id == advisory_id, _IS_FAILED
        )
        if channel is not None:
            q = q.where(deliveries.c.channel == channel)
        async with self._begin() as conn:
            rows = [(int(v), str(c), str(i)) for v, c, i in (await conn.execute(q.limit(limit))).all()]
            if rows:
                await conn.execute(
                    sa.update(deliveries)
                    .where(deliveries.c.id.in_([i for _, _, i in rows]), _IS_FAILED)
                    .values(
                        status=Status.QUEUED.value,
                        rank=Status.QUEUED.rank,
                        attempts=0,
                        reason="replayed by an operator",
                        updated_at=now(),
                    )
                )
        return rows

    async def cascade_due(
        self, channel: str, sent_before: datetime, limit: int
    ) -> list[tuple[str, str, int, str]]:
        """Deliveries on ``channel`` that the cascade has not dealt with and that were not confirmed
        in time — sent (or unknown) before ``sent_before``, or failed — of advisories still active and
        unexpired. Returns (delivery id, advisory id, version, recipient id). Two reads, each of a
        partial index: the sent ones by when they were sent, the unknown and failed ones."""
        t = deliveries.c
        active = sa.exists().where(
            advisories.c.id == t.advisory_id,
            advisories.c.version == t.version,
            advisories.c.state == A.ACTIVE.value,
            advisories.c.expires_at > now(),
        )
        columns = (t.id, t.advisory_id, t.version, t.recipient_id)
        sent = sa.select(*columns).where(
            _IS_SENT, t.sent_at <= sent_before, t.channel == channel, t.cascaded == sa.false(), active
        )
        unconfirmed = sa.select(*columns).where(
            _IS_UNCONFIRMED,
            t.channel == channel,
            sa.or_(t.status == Status.FAILED.value, t.sent_at <= sent_before),
            active,
        )
        out: list[tuple[str, str, int, str]] = []
        async with self.engine.connect() as conn:
            for q in (unconfirmed, sent):
                rows = (await conn.execute(q.limit(limit - len(out)))).all()
                out += [(str(i), str(a), int(v), str(r)) for i, a, v, r in rows]
                if len(out) >= limit:
                    break
        return out

    async def mark_cascaded(self, ids: Sequence[str]) -> None:
        async with self._begin() as conn:
            await conn.execute(
                sa.update(deliveries).where(deliveries.c.id.in_(list(ids))).values(cascaded=True)
            )

    async def delivery(self, delivery_id: str) -> sa.RowMapping | None:
        """One delivery's row (status, reason, attempts, partner_id, …), or None."""
        async with self.engine.connect() as conn:
            return (
                (await conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id)))
                .mappings()
                .first()
            )

    async def delivery_of(
        self, advisory_id: str, version: int, recipient_id: str, channel: str
    ) -> sa.RowMapping | None:
        """The delivery of an advisory version to a recipient on a channel (its id, status, …), or None."""
        t = deliveries.c
        q = sa.select(deliveries).where(
            t.advisory_id == advisory_id,
            t.version == version,
            t.recipient_id == recipient_id,
            t.channel == channel,
        )
        async with self.engine.connect() as conn:
            return (await conn.execute(q)).mappings().first()

    async def failure_reasons(
        self, advisory_id: str, version: int, limit: int = 8
    ) -> list[tuple[str, str, int]]:
        """The most frequent reasons of failed deliveries, (channel, reason, how many); they are
        stored as sentences already ("partner answered 400: …"). Reads the failed rows only."""
        q = (
            sa.select(deliveries.c.channel, deliveries.c.reason, sa.func.count().label("n"))
            .where(deliveries.c.advisory_id == advisory_id, deliveries.c.version == version, _IS_FAILED)
            .group_by(deliveries.c.channel, deliveries.c.reason)
            .order_by(sa.desc("n"))
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [(str(c), str(r or "—"), int(n)) for c, r, n in (await conn.execute(q)).all()]

    async def sent_within(self, advisory_id: str, version: int, seconds: float) -> tuple[int, int]:
        """(messages sent, of which within ``seconds`` of the version being stored). Reads the
        version's deliveries: for one advisory's page, not for a live view."""
        stored = sa.select(advisories.c.received_at).where(
            advisories.c.id == advisory_id, advisories.c.version == version
        )
        async with self.engine.connect() as conn:
            received = (await conn.execute(stored)).scalar()
            if received is None:
                return 0, 0
            sent = deliveries.c.sent_at.is_not(None)
            limit = aware(received) + timedelta(seconds=seconds)
            q = sa.select(
                sa.func.count().filter(sent), sa.func.count().filter(sent, deliveries.c.sent_at <= limit)
            ).where(deliveries.c.advisory_id == advisory_id, deliveries.c.version == version)
            total, within = (await conn.execute(q)).one()
        return int(total or 0), int(within or 0)
