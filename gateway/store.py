"""Durable state: advisories, recipients, deliveries, receipts (SQLAlchemy Core, async).

SQLite (aiosqlite, WAL) by default; PostgreSQL (asyncpg) with the same queries. Status changes are
guarded by rank (``Status.rank``) in the WHERE clause, so a late or repeated write never moves a
delivery backwards and concurrent writers cannot undo each other.

On SQLite the broadcast's hot transactions (a planner page, a batch's results, a batch of receipts,
the outbox emptied) are written by ``_SqliteWriter``: the stdlib driver in a thread of its own, a
whole transaction per hand-over and a whole batch per statement. Transactions and reads kept as
SQLAlchemy Core on a synchronous connection (``_transact``, ``_read``: an advisory's ``accept``, the
audience pages, a chunk's work) also run whole in a thread — the writer's, or one of the readers'
(``_SqliteReaders``) — one hand-over each; on PostgreSQL they go through asyncpg (``run_sync``). The
rest goes through SQLAlchemy's async engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import heapq
import itertools
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, NamedTuple, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.compiler import SQLCompiler

from gateway import audit as audit_log
from gateway import migrate as migrations
from gateway.errors import AuthorityError, DecisionError, NotFoundError
from gateway.lifecycle import (
    DECISIONS,
    A,
    AdvisoryState,
    Reference,
    arrival_state,
    can_move,
    check_move,
    has_authority,
    key,
    sources_of,
    withdrawal_by,
)
from gateway.logging import get_logger
from gateway.migrate import Mode
from gateway.models import (
    BULK,
    PENDING,
    SEGMENT_COUNTS,
    URGENT,
    Advisory,
    Contact,
    Recipient,
    SegmentReceipt,
    Status,
    aware,
    delivery_hash,
    delivery_id,
    now,
)
from gateway.schema import (
    FAILED_ROWS,
    PENDING_ROWS,
    SENT_ROWS,
    UNCONFIRMED_ROWS,
    advisories,
    deliveries,
    delivery_count_deltas,
    delivery_counts,
    delivery_events,
    held_receipts,
    metadata,
    partner_refs,
    receipts,
    recipients,
    segment_deliveries,
    withdrawals,
)

__all__ = [
    "SEGMENT_COUNTS",
    "Accepted",
    "AppliedReceipts",
    "By",
    "Count",
    "Event",
    "Outcome",
    "SegmentDelivery",
    "Store",
    "Version",
    "WorkItem",
    "metadata",
]

log = get_logger(__name__)

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


@dataclass(frozen=True, slots=True)
class Accepted:
    """What storing an advisory did: ``outcome`` for the log and metrics (accepted, duplicate,
    cancelled, superseded, completed), its state (None for a duplicate), pending deliveries withdrawn."""

    outcome: str
    state: AdvisoryState | None
    withdrawn_pending: int


@dataclass(frozen=True, slots=True)
class By:
    """Who withdraws advisories: ``key`` names what did it (an advisory ``id@vN``, or an operator's
    cancel), ``sender`` is on whose authority (kept with a withdrawal that overtakes its advisory),
    ``actor`` goes into the audit log."""

    key: str
    sender: str
    actor: str


@dataclass(frozen=True, slots=True)
class Version:
    """One stored advisory version as the API shows it."""

    advisory_id: str
    version: int
    msg_type: str
    sender: str
    state: AdvisoryState
    training: bool
    submitted_by: str | None
    received_at: datetime
    expires_at: datetime


COUNT_KEY = ("advisory_id", "version", "channel", "language", "status")


@dataclass(frozen=True, slots=True)
class Count:
    """One counter: how many deliveries of an advisory version on a channel, in a language, are in
    a status."""

    advisory_id: str
    version: int
    channel: str
    language: str
    status: str
    n: int


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
# SQLite's hot statements go to the driver as written, a batch in one statement (its rows as one
# multi-row VALUES), with the time formatted once. A statement per row (executemany) gives up Python's
# GIL and takes it back for every row, and with the event loop busy in the other thread each taking
# back waited: one batch of 500 took up to 70 times as long as on an idle process.
_SQLITE_ROWS = 1000  # rows in one statement at most


def _marks(n: int) -> str:
    return ", ".join("?" * n)


@functools.lru_cache(maxsize=64)
def _sqlite_values(head: str, width: int, n: int, tail: str = "") -> str:
    """``head`` VALUES (?, …) × ``n`` ``tail``."""
    row = f"({_marks(width)})"
    return f"{head} VALUES {', '.join([row] * n)}{tail}"


def _sqlite_insert(
    db: sqlite3.Connection, statement: tuple[str, str], rows: Sequence[tuple[Any, ...]]
) -> int:
    """``rows`` by ``statement`` (the INSERT before and after its VALUES), ``_SQLITE_ROWS`` at a time;
    returns how many were inserted."""
    head, tail = statement
    inserted = 0
    for start in range(0, len(rows), _SQLITE_ROWS):
        part = rows[start : start + _SQLITE_ROWS]
        done = db.execute(
            _sqlite_values(head, len(part[0]), len(part), tail), [v for row in part for v in row]
        )
        inserted += done.rowcount
    return inserted


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


def _lease_free(planner: Any, at: Any) -> sa.ColumnElement[bool]:
    """``planner`` may plan the advisory version at ``at``: nobody holds the lease, ``planner`` does,
    or the holder's has run out."""
    t = advisories.c
    return sa.or_(t.planner.is_(None), t.planner == planner, t.plan_lease_until < at)


def _claimed(advisory_id: Any, version: Any, after: Any, planner: Any, at: Any, until: Any) -> sa.Update:
    """Take or renew the lease to plan an advisory version, if its cursor is still ``after``."""
    t = advisories.c
    return (
        sa.update(advisories)
        .where(t.id == advisory_id, t.version == version, t.plan_cursor == after, _lease_free(planner, at))
        .values(planner=planner, plan_lease_until=until)
    )


# _claimed for SQLite's writer, as text once, with named parameters
_SQLITE_CLAIM = str(
    _claimed(
        *(sa.literal_column(f":{n}") for n in ("id", "version", "after", "planner", "at", "until"))
    ).compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
)

_RECEIPT_COLUMNS = ("delivery_id", "channel", "status", "partner_id", "received_at")
_SQLITE_RECEIPT = (f"INSERT INTO receipts ({', '.join(_RECEIPT_COLUMNS)})", "")


# every SQLite connection's settings (Store.open)
SQLITE_PRAGMAS = (
    "journal_mode=WAL",
    "synchronous=NORMAL",
    "busy_timeout=30000",
    # 16 MiB of pages per connection (the default is 2 MiB): the hot indexes of a broadcast's
    # deliveries stay in memory instead of being read again from the OS
    "cache_size=-16384",
    # checkpoint the WAL into the database every 20,000 pages (80 MB) instead of 1,000: a broadcast
    # rewrites the same index pages transaction after transaction, and each checkpoint copied them
    # again (18 % of the store's time at 100,000 deliveries); after a checkpoint the WAL file is cut
    # back to 64 MB
    "wal_autocheckpoint=20000",
    "journal_size_limit=67108864",
    "temp_store=MEMORY",
)
# the writer's own connection never checkpoints at its commits: a checkpoint of 20,000 pages made
# that COMMIT take 300-400 ms under load, the write turn held all the while (an urgent advisory's
# `accept` waited 400 ms behind one). A thread of its own checkpoints instead (PASSIVE: it takes no
# write lock), at most every CHECKPOINT_EVERY_S while the writer writes.
_WRITER_PRAGMAS = (*SQLITE_PRAGMAS, "wal_autocheckpoint=0")
CHECKPOINT_EVERY_S = 1.0


def _sqlite_time(at: datetime) -> str:
    """``at`` (UTC) as SQLAlchemy stores a DateTime in SQLite."""
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


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


_AT = "'__at__'"  # where a move's time goes in _sqlite_move's text


@functools.cache
def _sqlite_move(status: Status, attempted: bool, receipt: bool = False) -> tuple[str, str]:
    """``_moved`` for a batch on SQLite, as text once, in two parts: ``FROM (VALUES …) AS moved``
    goes between them (its columns: id, partner id, reason); the constants are written in, the time
    replaces ``_AT``."""
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
    text = str(statement.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))
    head, where = text.split(" WHERE ", 1)
    return head, where


Moves = dict[Status, list[tuple[str, str | None, str | None]]]  # (delivery id, partner id, reason)


def _by_status(outcomes: Iterable[Outcome]) -> Moves:
    by_status: Moves = defaultdict(list)
    for o in outcomes:
        by_status[o.status].append((o.delivery_id, o.partner_id, o.reason))
    return by_status


def _sqlite_record(
    db: sqlite3.Connection, by_status: Moves, at: datetime, attempted: bool, receipt: bool = False
) -> int:
    """Store.record's moves on SQLite's writer connection, a statement per status and up to
    ``_SQLITE_ROWS`` deliveries; returns rows moved."""
    stamp = f"'{_sqlite_time(at)}'"  # digits and separators only
    moved = 0
    for status, params in by_status.items():
        head, where = _sqlite_move(status, attempted, receipt)
        head = head.replace(_AT, stamp)
        for start in range(0, len(params), _SQLITE_ROWS):
            part = params[start : start + _SQLITE_ROWS]
            update = _sqlite_values(f"{head} FROM (", 3, len(part), f") AS moved WHERE {where}")
            moved += db.execute(update, [v for row in part for v in row]).rowcount
    return moved


_COLS = ", ".join(COUNT_KEY)
# PostgreSQL: take every delta, add them up per key, add the sums to the counters, in key order
_FOLD = (
    f"WITH folded AS (DELETE FROM delivery_count_deltas RETURNING {_COLS}, n), "  # noqa: S608
    f"summed AS (SELECT {_COLS}, sum(n) AS n, count(*) AS rows_ FROM folded GROUP BY {_COLS}), "
    f"upserted AS (INSERT INTO delivery_counts ({_COLS}, n) SELECT {_COLS}, n FROM summed "
    f"ORDER BY {_COLS} ON CONFLICT ({_COLS}) DO UPDATE SET n = delivery_counts.n + excluded.n) "
    "SELECT coalesce(sum(rows_), 0) FROM summed"
)


_EVENT_INTO = (
    "INSERT INTO delivery_events (delivery_id, advisory_id, version, channel, language, status, "
    "previous_status, reason, partner_id, at) "
)
# the outbox triggers (migration 0006 holds the table and PostgreSQL's trigger functions)
_EVENT_TRIGGERS = {
    "sqlite": [
        "CREATE TRIGGER IF NOT EXISTS deliveries_evented_insert AFTER INSERT ON deliveries BEGIN "
        + _EVENT_INTO
        + "VALUES (new.id, new.advisory_id, new.version, new.channel, new.language, new.status, NULL, "
        "new.reason, new.partner_id, new.updated_at); END",
        "CREATE TRIGGER IF NOT EXISTS deliveries_evented_update AFTER UPDATE OF status ON deliveries "
        "WHEN old.status <> new.status BEGIN "
        + _EVENT_INTO
        + "VALUES (new.id, new.advisory_id, new.version, new.channel, new.language, new.status, "
        "old.status, new.reason, new.partner_id, new.updated_at); END",
    ],
    "postgresql": [
        "CREATE OR REPLACE TRIGGER deliveries_evented_insert AFTER INSERT ON deliveries "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION deliveries_evented_insert()",
        "CREATE OR REPLACE TRIGGER deliveries_evented_update AFTER UPDATE ON deliveries "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION deliveries_evented_update()",
    ],
}


EVENT_SCHEMA = "delivery-event/1"


class Event(NamedTuple):
    """One applied status change of a delivery (the outbox row, gateway/events.py), as it is
    published: ``doc`` is its JSON object (docs/delivery-events.md), written by the database — a
    million deliveries make millions of events, and each one was built and encoded in Python."""

    seq: int
    key: str  # its advisory version, ``id@vN``: the record it goes in
    doc: str


def _event_doc(dialect: str) -> str:
    """The SQL of one outbox row's event document (docs/delivery-events.md)."""
    if dialect == "sqlite":  # times as SQLAlchemy stores them: 'YYYY-MM-DD HH:MM:SS.ffffff', UTC
        obj, at = "json_object", "replace(at, ' ', 'T') || '+00:00'"
    else:
        obj, at = (
            "json_build_object",
            """to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')""",
        )
    fields = {
        "schema": f"'{EVENT_SCHEMA}'",
        "seq": "seq",
        "delivery_id": "delivery_id",
        "advisory_id": "advisory_id",
        "version": "version",
        "channel": "channel",
        "language": "nullif(language, '')",
        "status": "status",
        "previous_status": "previous_status",
        "reason": "reason",
        "partner_id": "partner_id",
        "at": at,
    }
    pairs = ", ".join(f"'{k}', {v}" for k, v in fields.items())
    # as text: SQLite's json_array would take a JSON object in whole (a CAST keeps it JSON; || not)
    return f"{obj}({pairs}) || ''" if dialect == "sqlite" else f"CAST({obj}({pairs}) AS TEXT)"


def _take_events(dialect: str) -> str:
    """The oldest outbox rows (at most ``:limit``), in order: seq, key, document."""
    doc = _event_doc(dialect)
    oldest = "SELECT * FROM delivery_events ORDER BY seq LIMIT :limit"
    row = f"seq, advisory_id || '@v' || version, {doc}"
    if dialect == "sqlite":  # as one row of JSON (see _lists)
        return f"SELECT json_group_array(json_array({row})) FROM ({oldest})"  # noqa: S608
    return f"SELECT {row} FROM ({oldest}) AS oldest ORDER BY seq"  # noqa: S608


def _count(row: Sequence[Any]) -> Count:
    advisory_id, version, channel, language, status, n = row
    return Count(str(advisory_id), int(version), str(channel), str(language), str(status), int(n))


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
    sent_at: dict[str, datetime]
    held: int = 0  # receipts held for a partner id not recorded yet (not in ``unknown``)

    @classmethod
    def of(
        cls, items: Sequence[Outcome], found: Iterable[tuple[str, int, datetime | None, str]]
    ) -> _Receipted:
        """``found``: (delivery id, rank, sent_at, status) of the deliveries the receipts name."""
        ranks: dict[str, int] = {}
        sent_at: dict[str, datetime] = {}
        withdrawn: set[str] = set()
        for i, rank, at, status in found:
            ranks[i] = rank
            if at is not None:
                sent_at[i] = at
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
        return cls(known, [o for o in items if o.delivery_id not in ranks], moved, before, sent_at)

    def result(self, at: datetime) -> AppliedReceipts:
        reached = Status.DELIVERED.rank
        first_reached = {
            o.delivery_id
            for o in self.moved
            if o.status in (Status.DELIVERED, Status.READ)
            and self.before[o.delivery_id] < reached
            and o.delivery_id in self.sent_at
        }
        latencies = [(at - self.sent_at[i]).total_seconds() for i in first_reached]
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
    found = [
        (i, r, datetime.fromisoformat(t).replace(tzinfo=UTC) if t else None, st)
        for i, r, t, st in _sqlite_all(db, "id, rank, sent_at, status", rest, ids)
    ]
    applied = _Receipted.of(items, found)
    _sqlite_record(db, _by_status(_last_per_delivery(applied.moved)), at, attempted=False, receipt=True)
    if applied.known:
        stamp = _sqlite_time(at)
        rows = [(o.delivery_id, channel, o.status.value, o.partner_id, stamp) for o in applied.known]
        _sqlite_insert(db, _SQLITE_RECEIPT, rows)
    return applied


_SQLITE_REFS = ("INSERT INTO partner_refs (channel, partner_id, delivery_id)", " ON CONFLICT DO NOTHING")
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


class Outcome(NamedTuple):
    delivery_id: str
    status: Status
    partner_id: str | None = None
    reason: str | None = None


_VERSION_COLUMNS = (
    advisories.c.id,
    advisories.c.version,
    advisories.c.msg_type,
    advisories.c.sender,
    advisories.c.state,
    advisories.c.training,
    advisories.c.submitted_by,
    advisories.c.received_at,
    advisories.c.expires_at,
)


def _version(row: sa.RowMapping) -> Version:
    return Version(
        advisory_id=str(row["id"]),
        version=int(row["version"]),
        msg_type=str(row["msg_type"]),
        sender=str(row["sender"]),
        state=AdvisoryState(row["state"]),
        training=bool(row["training"]),
        submitted_by=row["submitted_by"],
        received_at=aware(row["received_at"]),
        expires_at=aware(row["expires_at"]),
    )


def _newest_only(q: sa.Select[Any]) -> sa.Select[Any]:
    """``q`` (over ``advisories``) restricted to each advisory's newest stored version."""
    newest = (
        sa.select(advisories.c.id, sa.func.max(advisories.c.version).label("version"))
        .group_by(advisories.c.id)
        .subquery()
    )
    return q.join(newest, sa.and_(advisories.c.id == newest.c.id, advisories.c.version == newest.c.version))


def _in_audience(
    q: sa.Select[Any], countries: Sequence[str], regions: Sequence[str], tags: Sequence[str]
) -> sa.Select[Any]:
    """``q`` restricted to the recipients an audience names (none, if it names none of these: an
    audience of partner segments only has no one in our directory)."""
    if not (countries or regions or tags):
        return q.where(sa.false())
    if countries:
        q = q.where(recipients.c.country.in_(list(countries)))
    if regions:
        q = q.where(recipients.c.region.in_(list(regions)))
    if tags:
        q = q.where(sa.or_(*(recipients.c.tags.contains(f",{t},", autoescape=True) for t in tags)))
    return q


def _recipient_row(r: Recipient, at: datetime) -> dict[str, Any]:
    return {
        "id": r.id,
        "languages": "|".join(r.languages),
        "phone": r.phone,
        "email": r.email,
        "app_user": r.app_user,
        "country": r.country,
        "region": r.region,
        "tags": "," + ",".join(r.tags) + "," if r.tags else "",
        "opt_outs": "|".join(r.opt_outs),
        "updated_at": at,
    }


def _lists(conn: sa.Connection, q: sa.Select[Any]) -> list[list[Any]]:
    """The rows of ``q``, each a list in the query's column order. On SQLite as one row, a JSON array
    of them: its driver runs in a thread of its own and takes Python's lock back for every row it
    steps to, and each time waits for the event loop to give it up (up to
    ``sys.getswitchinterval()``, 5 ms): 500 rows read while the loop was busy took 1.9 s instead of
    3 ms (docs/performance.md, fourth pass). Times come back as SQLite holds them (text), booleans as
    0/1; the order is the query's."""
    if conn.dialect.name != "sqlite":
        return [list(r) for r in conn.execute(q).all()]
    sub = q.subquery()
    (doc,) = (conn.execute(sa.select(sa.func.json_group_array(sa.func.json_array(*sub.c))))).one()
    rows: list[list[Any]] = orjson.loads(doc)
    return rows


def _all(conn: sa.Connection, q: sa.Select[Any]) -> list[dict[str, Any]]:
    """The rows of ``q`` as mappings (``_lists``)."""
    names = list(q.selected_columns.keys())
    return [dict(zip(names, r, strict=True)) for r in _lists(conn, q)]


# a recipient's columns in the order of Contact's fields
_CONTACT = (
    recipients.c.id,
    recipients.c.languages,
    recipients.c.phone,
    recipients.c.email,
    recipients.c.app_user,
    recipients.c.country,
    recipients.c.region,
    recipients.c.tags,
    recipients.c.opt_outs,
)


def _sqlite_text(statement: sa.ClauseElement) -> tuple[str, list[Any]]:
    """A statement as SQLite text and its parameters, for the writer's connection (times as
    SQLAlchemy stores them in SQLite)."""
    compiled = statement.compile(dialect=sqlite.dialect())
    assert isinstance(compiled, SQLCompiler)
    params = compiled.construct_params() or {}
    values = (params[name] for name in compiled.positiontup or ())
    return str(compiled), [_sqlite_time(v) if isinstance(v, datetime) else v for v in values]


def _sqlite_all(db: sqlite3.Connection, columns: str, rest: str, params: Sequence[Any]) -> list[list[Any]]:
    """``SELECT columns rest`` on the writer's connection, as one row of JSON (see ``_all``)."""
    q = f"SELECT json_group_array(json_array({columns})) {rest}"
    (doc,) = db.execute(q, params).fetchone()
    rows: list[list[Any]] = orjson.loads(doc)
    return rows


# the priority of the work the current task does (Advisory.priority): see working_for()
_WORKING_FOR: ContextVar[float] = ContextVar("working_for", default=BULK)
# receipts' write turns come after urgent work's and before bulk work's: a delivery's receipt finishes
# work already sent, and a partner that posts its receipts one call at a time waited a whole round of
# bulk writes for each call (a million deliveries: all delivered 37 s after all sent)
_RECEIPTS = (URGENT + BULK) / 2


@contextlib.contextmanager
def working_for(priority: float) -> Iterator[None]:
    """The store's writes and reads made inside are for work of ``priority``: on SQLite an urgent
    advisory's take the next turn of the writer (or a reader), ahead of bulk ones that were waiting."""
    token = _WORKING_FOR.set(priority)
    try:
        yield
    finally:
        _WORKING_FOR.reset(token)


T = TypeVar("T")


def _sqlite_connect(path: str, pragmas: Sequence[str]) -> sqlite3.Connection:
    """A stdlib connection for a thread of the store's own (the writer, a reader, the checkpointer)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    for pragma in pragmas:
        db.execute(f"PRAGMA {pragma}")
    return db


class _Held:
    """The writer's connection as SQLAlchemy sees it (``_SqliteWriter.run_core``): the transaction is
    the writer's own (BEGIN IMMEDIATE … COMMIT or ROLLBACK), so SQLAlchemy's commit, rollback and
    close leave it alone."""

    def __init__(self, db: sqlite3.Connection | None) -> None:
        object.__setattr__(self, "_db", db)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._db, name, value)

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Job:
    """One turn of a store thread: ``work`` to run on its connection — or, for the writer, a hold
    (``work`` None): the turn handed to a transaction of the engine's, the writer waiting until it is
    released."""

    def __init__(self, work: Callable[[Any], Any] | None, loop: asyncio.AbstractEventLoop) -> None:
        self.work = work
        self.loop = loop
        self.done: asyncio.Future[Any] = loop.create_future()
        self.state = "waiting"  # → started | dropped (its awaiter went before its turn came)
        self.released = threading.Event()  # a hold's end

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """(In the store's thread.) The outcome, to the event loop."""
        self.loop.call_soon_threadsafe(_settle, self.done, result, error)


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not done.done():
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)


class _Turns:
    """Jobs for a few threads of the store's own, taken in turn: urgent work's first (``working_for``),
    then receipts, then the rest in order of arrival. A thread goes on to the next job as soon as one
    ends, without waiting for the event loop to take the result (turns handed over by a busy loop
    had left SQLite's writer idle 3 ms between transactions: 30 % of its time at 200,000 deliveries).
    Cancelled before its turn, a job never runs; cancelled while it runs, it ends first."""

    def __init__(self, name: str, threads: int, serve: Callable[[_Job], None]) -> None:
        self._name = name
        self._size = threads
        self._serve_one = serve
        self._jobs: list[tuple[float, int, _Job]] = []
        self._arrivals = itertools.count()
        self._lock = threading.Condition()
        self._closing = False
        self._threads: list[threading.Thread] = []

    def submit(self, work: Callable[[Any], Any] | None) -> _Job:
        job = _Job(work, asyncio.get_running_loop())
        with self._lock:
            if not self._threads:
                self._threads = [
                    threading.Thread(target=self._serve, name=f"{self._name}-{i}", daemon=True)
                    for i in range(self._size)
                ]
                for thread in self._threads:
                    thread.start()
            heapq.heappush(self._jobs, (_WORKING_FOR.get(), next(self._arrivals), job))
            self._lock.notify()
        return job

    def drop(self, job: _Job) -> bool:
        """Take a job back that has not started: True if it will not run."""
        with self._lock:
            if job.state == "waiting":
                job.state = "dropped"
                return True
            return False

    async def run(self, work: Callable[[Any], T]) -> T:
        """``work`` in its turn; its result."""
        job = self.submit(work)
        try:
            result: T = await asyncio.shield(job.done)
            return result
        except asyncio.CancelledError:
            if not self.drop(job):  # under way: it ends in its thread first
                await asyncio.wait([job.done])
            raise

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closing:
                    self._lock.wait()
                if not self._jobs:
                    return
                _, _, job = heapq.heappop(self._jobs)
                if job.state == "dropped":
                    continue
                job.state = "started"
            self._serve_one(job)

    async def close(self) -> None:
        """Every job already submitted runs; then the threads end."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            threads = list(self._threads)
        for thread in threads:
            await asyncio.to_thread(thread.join)


class _SqliteWriter:
    """SQLite's one writer in this process: a thread of its own and its own connection, taking every
    write transaction in turn (``_Turns``) and running each whole: BEGIN, the statements, COMMIT in
    one hand-over from the event loop. Through SQLAlchemy each statement was a hand-over of its own,
    and between them the transaction — SQLite's only write lock — waited for a busy event loop to
    come round. A transaction of the engine's (``_begin``) takes a turn too (``hold``): the writer
    waits while it runs, so two connections never write at once. (Writers that collide in SQLite
    itself sleep in its busy handler, 1 ms to 100 ms; and in plain arrival order an urgent advisory's
    writes each waited behind every bulk batch.)"""

    def __init__(self, path: str) -> None:
        self._path = path
        self._turns = _Turns("sqlite-writer", 1, self._serve_one)
        self._db: sqlite3.Connection | None = None
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._checkpoint_db: sqlite3.Connection | None = None
        self._checkpointing: Future[None] | None = None
        self._next_checkpoint = 0.0
        # SQLAlchemy over this same connection, for transactions kept as Core statements (run_core)
        self._core = sa.create_engine(
            "sqlite://", creator=lambda: _Held(self._db), poolclass=sa.pool.StaticPool
        )

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` as one transaction, in its turn. Cancelled while it runs: it ends first."""
        return await self._turns.run(work)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """The writer's turn, for a transaction on another connection (the engine's): the writer
        waits until the block ends."""
        job = self._turns.submit(None)
        try:
            await asyncio.shield(job.done)
        except asyncio.CancelledError:
            if not self._turns.drop(job):  # handed the turn meanwhile: give it back
                job.released.set()
            raise
        try:
            yield
        finally:
            job.released.set()

    def _serve_one(self, job: _Job) -> None:
        if job.work is None:  # a hold: the turn is the engine's until it is released
            job.settle()
            job.released.wait()
            return
        try:
            result = self._transaction(job.work)
        except BaseException as e:  # the caller's to handle
            job.settle(error=e)
        else:
            job.settle(result)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._db = _sqlite_connect(self._path, _WRITER_PRAGMAS)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self._checkpoint_soon()
        return result

    def _checkpoint_soon(self) -> None:
        """(In the writer's thread, after a commit.) Start a checkpoint in its own thread unless one
        runs or one started less than CHECKPOINT_EVERY_S ago."""
        at = time.monotonic()
        if at < self._next_checkpoint or (self._checkpointing is not None and not self._checkpointing.done()):
            return
        self._next_checkpoint = at + CHECKPOINT_EVERY_S
        self._checkpointing = self._checkpointer.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        if self._checkpoint_db is None:
            self._checkpoint_db = _sqlite_connect(self._path, SQLITE_PRAGMAS)
        self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def run_core(self, work: Callable[[sa.Connection], T]) -> T:
        """``work`` with a SQLAlchemy connection over this one, as one transaction in its thread."""

        def core(_: sqlite3.Connection) -> T:
            with self._core.connect() as conn:
                return work(conn)

        return await self.run(core)

    async def close(self) -> None:
        """Every turn already taken runs; then the connections close."""
        await self._turns.close()
        self._core.dispose()
        await asyncio.to_thread(self._checkpointer.shutdown)  # a checkpoint under way ends first
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
            self._checkpoint_db = None
        if self._db is not None:
            self._db.close()
            self._db = None


class _SqliteReaders:
    """SQLite's reads, each whole in one of a few threads of their own, each thread with its own
    connection and SQLAlchemy over it: one hand-over from the event loop per read, where through
    aiosqlite a read was several (the connection taken from the pool, the statement, its rows, the
    connection given back), each waiting for a busy loop to come round. Reads take turns as writes do
    (``_Turns``): an urgent advisory's reads go before the bulk reads waiting (a thread pool served
    them in order of arrival)."""

    def __init__(self, path: str, threads: int = 4) -> None:
        self._path = path
        self._turns = _Turns("sqlite-reader", threads, self._serve_one)
        self._local = threading.local()
        self._engines: list[sa.Engine] = []
        self._lock = threading.Lock()

    async def run(self, work: Callable[[sa.Connection], T]) -> T:
        return await self._turns.run(work)

    def _serve_one(self, job: _Job) -> None:
        assert job.work is not None
        try:
            result = self._read(job.work)
        except BaseException as e:  # the caller's to handle
            job.settle(error=e)
        else:
            job.settle(result)

    def _read(self, work: Callable[[sa.Connection], T]) -> T:
        engine: sa.Engine | None = getattr(self._local, "engine", None)
        if engine is None:
            db = _sqlite_connect(self._path, SQLITE_PRAGMAS)
            engine = self._local.engine = sa.create_engine(
                "sqlite://", creator=lambda: db, poolclass=sa.pool.StaticPool
            )
            with self._lock:
                self._engines.append(engine)
        with engine.connect() as conn:
            return work(conn)

    async def close(self) -> None:
        await self._turns.close()
        with self._lock:
            for engine in self._engines:
                engine.dispose()
            self._engines.clear()


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        # SQLite has one writer at a time: in one process, writers take turns at _SqliteWriter (its
        # hot transactions run on its own connection, the others on the engine's in its turn).
        # PostgreSQL needs no such thing.
        self._writer: _SqliteWriter | None = None
        self._readers: _SqliteReaders | None = None
        if self._dialect == "sqlite":
            path = engine.url.database
            if not path or path == ":memory:":
                raise ValueError("store.url: SQLite needs a database file (every connection shares it)")
            self._writer = _SqliteWriter(path)
            self._readers = _SqliteReaders(path)
        # PostgreSQL: deliveries inserted since this process last had the table analyzed (see _grown)
        self._inserted = 0
        self._analyzed_at = 0
        self._parsed: dict[tuple[str, int], Advisory] = {}

    @contextlib.asynccontextmanager
    async def begin_write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction for the modules that keep their own queries (auth, audit)."""
        async with self._begin() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (on SQLite, one at a time in this process: in the writer's turn)."""
        if self._writer is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._writer.hold(), self.engine.begin() as conn:
            yield conn

    @classmethod
    async def open(cls, url: str, migrate: Mode = "upgrade") -> Store:
        """Connect, and bring the schema to this release's (or refuse: gateway/migrate.py)."""
        if url.startswith("sqlite"):
            engine = create_async_engine(url, connect_args={"timeout": 30})

            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(dbapi_conn: Any, _: Any) -> None:
                cur = dbapi_conn.cursor()
                for pragma in SQLITE_PRAGMAS:
                    cur.execute(f"PRAGMA {pragma}")
                cur.close()

        else:
            engine = create_async_engine(url, pool_size=10)
        try:
            await migrations.ensure(engine, migrate)
            return cls(engine)
        except BaseException:
            await engine.dispose()
            raise

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
        if self._readers is not None:
            await self._readers.close()
        await self.engine.dispose()

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` as one SQLite transaction in the writer's thread, in its turn."""
        assert self._writer is not None
        return await self._writer.run(work)

    async def _transact(self, work: Callable[[sa.Connection], T]) -> T:
        """``work`` (Core statements on a synchronous connection) as one write transaction. On
        SQLite whole in the writer's thread, in this process's write turn: one hand-over from the
        event loop, where through aiosqlite each statement was one (an advisory's ``accept``, a
        dozen statements, held the write lock ~110 ms under load). Elsewhere through the async
        driver (``run_sync``)."""
        if self._writer is not None:
            return await self._writer.run_core(work)
        async with self.engine.begin() as conn:
            return await conn.run_sync(work)

    async def _read(self, work: Callable[[sa.Connection], T]) -> T:
        """``work`` (Core statements on a synchronous connection) on a reading connection: on SQLite
        whole in a reader's thread (one hand-over), elsewhere through the async driver."""
        if self._readers is not None:
            return await self._readers.run(work)
        async with self.engine.connect() as conn:
            return await conn.run_sync(work)

    async def ping(self) -> None:
        """One round trip to the database (readiness)."""
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    # -- recipients ---------------------------------------------------------------------------

    async def upsert_recipients(self, batch: Sequence[Recipient]) -> None:
        if not batch:
            return
        at = now()
        stmt = self._insert(recipients)
        stmt = stmt.on_conflict_do_update(
            index_elements=[recipients.c.id],
            set_={c.name: stmt.excluded[c.name] for c in recipients.columns if c.name != "id"},
        )
        async with self._begin() as conn:
            await conn.execute(stmt, [_recipient_row(r, at) for r in batch])

    async def count_recipients(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(recipients))).scalar_one())

    async def audience_page(
        self, countries: Sequence[str], regions: Sequence[str], tags: Sequence[str], after: str, limit: int
    ) -> list[Contact]:
        """One page of the audience, in id order after ``after`` (keyset paging: nothing held open)."""
        page: sa.Select[Any] = sa.select(*_CONTACT).where(recipients.c.id > after)
        q = _in_audience(page.order_by(recipients.c.id).limit(limit), countries, regions, tags)
        return [Contact(*row) for row in await self._read(partial(_lists, q=q))]

    # -- advisories ---------------------------------------------------------------------------

    @staticmethod
    def _value(conn: sa.Connection, column: sa.Column[Any], advisory_id: str, version: int) -> Any:
        """One column of a stored advisory version, or None if it is not stored."""
        q = sa.select(column).where(advisories.c.id == advisory_id, advisories.c.version == version)
        return (conn.execute(q)).scalar()

    async def advisory_state(self, advisory_id: str, version: int) -> AdvisoryState | None:
        """The state of a stored advisory version, or None if it is not stored."""
        return await self._read(lambda conn: self._state_in(conn, advisory_id, version))

    async def accept(
        self,
        adv: Advisory,
        raw: Mapping[str, Any],
        authorities: Mapping[str, Sequence[str]],
        submitted_by: str | None = None,
        approval: str | None = None,
    ) -> Accepted:
        """Store an advisory version and apply what it carries — in **one transaction**: the record,
        the supersede of its older versions, the withdrawals it makes (cancel, update) and those
        made of it before it came, and its plan's schedule (``active``, not yet planned). A record
        stored already changes nothing (``duplicate``). A cancel or update of another sender's
        advisory without authority raises AuthorityError and stores nothing (gateway/lifecycle.py).
        ``approval``: why the approval policy wants a second person (gateway/approval.py): the
        advisory waits in ``pending_approval`` instead of becoming ``active``. ``submitted_by``:
        the API token that submitted it (else its sender), the one who may not approve it."""
        submitted_by = submitted_by or f"sender:{adv.sender}"

        def work(conn: sa.Connection) -> Accepted:
            self._check_authority(conn, adv, authorities)  # before all: a forged replay too
            if self._state_in(conn, adv.id, adv.version) is not None:
                return Accepted("duplicate", None, 0)
            withdraws = withdrawal_by(adv.msg_type)
            if withdraws is A.CANCELLED:
                state = A.COMPLETED  # a cancel's work is done once it is applied, below
            else:
                remembered = self._remembered(conn, adv, authorities)
                newer = (
                    conn.execute(
                        sa.select(sa.func.count())
                        .select_from(advisories)
                        .where(advisories.c.id == adv.id, advisories.c.version > adv.version)
                    )
                ).scalar_one()
                state = arrival_state(remembered, bool(newer))
                if state is A.ACTIVE and approval is not None:
                    state = A.PENDING_APPROVAL
            conn.execute(
                self._insert(advisories).values(
                    id=adv.id,
                    version=adv.version,
                    msg_type=adv.msg_type,
                    sender=adv.sender,
                    priority=adv.priority,
                    expires_at=adv.expires_at,
                    state=state.value,
                    body=dict(raw),
                    received_at=now(),
                    submitted_by=submitted_by,
                    training=adv.training,
                )
            )
            detail: dict[str, Any] = {"msg_type": adv.msg_type, "references": list(adv.references)}
            if state is A.PENDING_APPROVAL:
                detail["approval"] = approval
            if adv.training:
                detail["training"] = True
            audit_log.append(conn, submitted_by, f"advisory.{state.value}", adv.key, detail)
            by = By(adv.key, adv.sender, submitted_by)
            moved = 0
            if withdraws is not A.CANCELLED:
                older = (advisories.c.id == adv.id, advisories.c.version < adv.version)
                moved += self._withdraw_in(conn, older, A.SUPERSEDED, by)
            if withdraws is not None:
                for ref in map(Reference.parse, adv.references):
                    if ref.advisory_id == adv.id and withdraws is A.SUPERSEDED:
                        continue  # an update's own earlier versions: superseded just above
                    moved += self._withdraw_ref(conn, ref.advisory_id, withdraws, by)
            return Accepted(state.value if state is not A.ACTIVE else "accepted", state, moved)

        return await self._transact(work)

    async def decide(
        self, advisory_id: str, version: int | None, decision: AdvisoryState, actor: str, reason: str | None
    ) -> Version:
        """An approver's decision on a version waiting in ``pending_approval`` (the newest waiting
        one if ``version`` is None): ``active`` (approve), ``rejected`` or ``returned`` (with a
        reason). The submitter may not decide on their own (the two-person rule). One transaction
        with its audit entry; the planner picks an approved advisory up from the store."""
        if decision not in DECISIONS:
            raise DecisionError(f"decision: {decision.value} is not an approver's decision")

        def work(conn: sa.Connection) -> Version:
            rows = self._versions_in(conn, advisory_id)
            if not rows:
                raise NotFoundError(f"advisory_id: no advisory {advisory_id!r} is stored")
            if version is None:
                waiting = [v for v in rows if v.state is A.PENDING_APPROVAL]
                if not waiting:
                    newest = rows[-1]
                    raise DecisionError(
                        f"advisory {advisory_id!r} has no version waiting for approval "
                        f"({key(advisory_id, newest.version)} is {newest.state.value})"
                    )
                target = waiting[-1]
            else:
                found = [v for v in rows if v.version == version]
                if not found:
                    raise NotFoundError(f"version: advisory {advisory_id!r} has no version {version}")
                target = found[0]
            if target.state is not A.PENDING_APPROVAL:
                raise DecisionError(
                    f"{key(advisory_id, target.version)} is {target.state.value}, not pending_approval"
                )
            if target.submitted_by == actor:
                raise DecisionError(
                    "the submitter may not approve, reject or return their own advisory: "
                    "a second person must decide",
                    status=403,
                )
            check_move(target.state, decision)
            result = conn.execute(
                sa.update(advisories)
                .where(
                    advisories.c.id == advisory_id,
                    advisories.c.version == target.version,
                    advisories.c.state == A.PENDING_APPROVAL.value,
                )
                .values(state=decision.value)
            )
            if not result.rowcount:  # another decision got there first
                raise DecisionError(f"{key(advisory_id, target.version)} was decided meanwhile")
            detail = {"from": A.PENDING_APPROVAL.value, "reason": reason, "submitted_by": target.submitted_by}
            audit_log.append(
                conn, actor, f"advisory.{decision.value}", key(advisory_id, target.version), detail
            )
            return dataclasses.replace(target, state=decision)

        return await self._transact(work)

    async def cancel(self, advisory_id: str, actor: str, reason: str) -> int:
        """An operator's cancel of every version of an advisory, at once (no approval: stopping a
        wrong message never waits). Its pending deliveries are cancelled; returns how many.
        A later version arriving with this id is stored cancelled too, as after a cancel record."""

        def work(conn: sa.Connection) -> int:
            rows = self._versions_in(conn, advisory_id)
            if not rows:
                raise NotFoundError(f"advisory_id: no advisory {advisory_id!r} is stored")
            live = [v for v in rows if can_move(v.state, A.CANCELLED)]
            if not live:
                raise DecisionError(
                    f"advisory {advisory_id!r} cannot be cancelled: it is "
                    + ", ".join(sorted({v.state.value for v in rows}))
                )
            by = By(f"cancel:{actor}"[:128], rows[-1].sender, actor)
            return self._withdraw_ref(conn, advisory_id, A.CANCELLED, by, reason)

        return await self._transact(work)

    async def expire_unapproved(self, waiting_since: datetime) -> list[str]:
        """Versions in ``pending_approval`` since before ``waiting_since`` become ``expired`` (the
        approval timeout), each with an audit entry; returns their keys."""
        q = sa.select(advisories.c.id, advisories.c.version).where(
            advisories.c.state == A.PENDING_APPROVAL.value, advisories.c.received_at <= waiting_since
        )

        def work(conn: sa.Connection) -> list[str]:
            out = []
            for advisory_id, version in (conn.execute(q)).all():
                result = conn.execute(
                    sa.update(advisories)
                    .where(
                        advisories.c.id == advisory_id,
                        advisories.c.version == version,
                        advisories.c.state == A.PENDING_APPROVAL.value,
                    )
                    .values(state=A.EXPIRED.value)
                )
                if result.rowcount:
                    subject = key(str(advisory_id), int(version))
                    detail = {"from": A.PENDING_APPROVAL.value, "reason": "no approval in time"}
                    audit_log.append(conn, "gateway", f"advisory.{A.EXPIRED.value}", subject, detail)
                    out.append(subject)
            return out

        return await self._transact(work)

    async def versions(self, advisory_id: str) -> list[Version]:
        """Every stored version of an advisory, oldest first."""
        return await self._read(lambda conn: self._versions_in(conn, advisory_id))

    @staticmethod
    def _versions_in(conn: sa.Connection, advisory_id: str) -> list[Version]:
        q = sa.select(*_VERSION_COLUMNS).where(advisories.c.id == advisory_id).order_by(advisories.c.version)
        return [_version(r) for r in (conn.execute(q)).mappings().all()]

    async def newest_versions(
        self,
        states: Sequence[str] = (),
        sender: str | None = None,
        training: bool | None = None,
        before: datetime | None = None,
        limit: int = 100,
    ) -> list[Version]:
        """The newest version of each advisory, newest first, filtered by its state, its sender,
        training or not, and stored before ``before`` (to page)."""
        q = (
            _newest_only(sa.select(*_VERSION_COLUMNS))
            .order_by(advisories.c.received_at.desc(), advisories.c.id)
            .limit(limit)
        )
        if states:
            q = q.where(advisories.c.state.in_(list(states)))
        if sender is not None:
            q = q.where(advisories.c.sender == sender)
        if training is not None:
            q = q.where(advisories.c.training == training)
        if before is not None:
            q = q.where(advisories.c.received_at < before)
        async with self.engine.connect() as conn:
            return [_version(r) for r in (await conn.execute(q)).mappings().all()]

    async def audience_size(
        self, countries: Sequence[str], regions: Sequence[str], tags: Sequence[str]
    ) -> int:
        """How many recipients an audience names (the approval policy's ``min_audience``)."""
        q = _in_audience(sa.select(sa.func.count()).select_from(recipients), countries, regions, tags)
        async with self.engine.connect() as conn:
            return int((await conn.execute(q)).scalar_one())

    def _state_in(self, conn: sa.Connection, advisory_id: str, version: int) -> AdvisoryState | None:
        state = self._value(conn, advisories.c.state, advisory_id, version)
        return None if state is None else AdvisoryState(state)

    async def check_authority(self, adv: Advisory, authorities: Mapping[str, Sequence[str]]) -> None:
        """AuthorityError if ``adv`` would be refused for authority by ``accept`` (the API asks first)."""
        await self._read(lambda conn: self._check_authority(conn, adv, authorities))

    def _check_authority(
        self, conn: sa.Connection, adv: Advisory, authorities: Mapping[str, Sequence[str]]
    ) -> None:
        """Another version of this id, or an advisory it cancels or updates, sent by someone over
        whom ``adv.sender`` has no authority → AuthorityError naming both."""
        named = {adv.id}
        if withdrawal_by(adv.msg_type) is not None:
            named |= {Reference.parse(r).advisory_id for r in adv.references}
        q = (
            sa.select(advisories.c.id, advisories.c.sender)
            .where(advisories.c.id.in_(sorted(named)))
            .distinct()
        )
        for advisory_id, owner in (conn.execute(q)).all():
            if not has_authority(adv.sender, str(owner), authorities):
                raise AuthorityError(
                    f"sender: {adv.sender!r} may not {'cancel' if adv.msg_type == 'cancel' else 'update'} "
                    f"{advisory_id!r}, sent by {owner!r} (intake.authorities names who may)"
                )

    def _remembered(
        self, conn: sa.Connection, adv: Advisory, authorities: Mapping[str, Sequence[str]]
    ) -> AdvisoryState | None:
        """A withdrawal that named ``adv`` before it arrived, if its sender had authority."""
        row = (
            conn.execute(
                sa.select(withdrawals.c.state, withdrawals.c.by_sender, withdrawals.c.by_id).where(
                    withdrawals.c.advisory_id == adv.id
                )
            )
        ).first()
        if row is None:
            return None
        by_sender = str(row.by_sender or adv.sender)  # rows from before by_sender was kept: trusted
        if not has_authority(by_sender, adv.sender, authorities):
            log.warning(
                "advisory.withdrawal_ignored",
                advisory_id=adv.id,
                by=row.by_id,
                by_sender=by_sender,
                sender=adv.sender,
                reason="the withdrawal's sender has no authority over this sender",
            )
            return None
        return AdvisoryState(row.state)

    def _withdraw_ref(
        self, conn: sa.Connection, advisory_id: str, state: AdvisoryState, by: By, reason: str | None = None
    ) -> int:
        """Remember that ``by`` withdrew ``advisory_id`` (every version, even one not received yet)
        and withdraw what is stored of it. A cancel outranks a supersede."""
        stmt = self._insert(withdrawals).values(
            advisory_id=advisory_id, state=state.value, by_id=by.key, by_sender=by.sender, at=now()
        )
        if state is A.CANCELLED:
            stmt = stmt.on_conflict_do_update(
                index_elements=[withdrawals.c.advisory_id],
                set_={"state": state.value, "by_id": by.key, "by_sender": by.sender},
            )
        else:
            stmt = stmt.on_conflict_do_nothing()
        conn.execute(stmt)
        return self._withdraw_in(conn, (advisories.c.id == advisory_id,), state, by, reason)

    def _withdraw_in(
        self,
        conn: sa.Connection,
        where: tuple[sa.ColumnElement[bool], ...],
        state: AdvisoryState,
        by: By,
        reason: str | None = None,
    ) -> int:
        """Versions matching ``where`` move to ``state`` where the lifecycle allows it (each move an
        audit entry); their pending deliveries are cancelled. Returns how many were cancelled."""
        versions = (
            conn.execute(sa.select(advisories.c.id, advisories.c.version, advisories.c.state).where(*where))
        ).all()
        movable = set(sources_of(state))
        for advisory_id, version, current in versions:
            if current in movable:
                detail = {"from": current, "by": by.key, **({"reason": reason} if reason else {})}
                audit_log.append(conn, by.actor, f"advisory.{state.value}", key(advisory_id, version), detail)
        conn.execute(
            sa.update(advisories)
            .where(*where, advisories.c.state.in_(sources_of(state)))
            .values(state=state.value)
        )
        moved = 0
        for advisory_id, version, _ in versions:
            moved += _transition(
                conn,
                (deliveries.c.advisory_id == advisory_id, deliveries.c.version == version, _IS_PENDING),
                Status.CANCELLED,
                f"advisory {state.value} by {by.key}",
            )
        return moved

    async def advisory(self, advisory_id: str, version: int) -> Advisory | None:
        """A stored advisory version, parsed once per process (a version never changes; its state,
        which does, is read with ``get_advisory_state``)."""
        key = (advisory_id, version)
        if key not in self._parsed:
            q = sa.select(advisories.c.body).where(
                advisories.c.id == advisory_id, advisories.c.version == version
            )
            async with self.engine.connect() as conn:
                body = (await conn.execute(q)).scalar()
            if body is None:
                return None
            self._parsed[key] = Advisory.model_validate(body)
        return self._parsed[key]

    async def _set_advisory(self, advisory_id: str, version: int, **values: Any) -> None:
        await self._execute(
            sa.update(advisories)
            .where(advisories.c.id == advisory_id, advisories.c.version == version)
            .values(**values)
        )

    async def _execute(self, statement: sa.Update | sa.Delete | sa.Insert) -> int:
        """One write statement as its own transaction; returns the rows it changed. On SQLite in the
        writer's thread, one hand-over instead of a trip through aiosqlite for BEGIN, the statement
        and COMMIT each (a planning cursor saved so held the write lock 74 ms under load)."""
        if self._writer is None:
            async with self._begin() as conn:
                return (await conn.execute(statement)).rowcount
        text, params = _sqlite_text(statement)
        return await self._write(lambda db: db.execute(text, params).rowcount)

    async def received_at(self, advisory_id: str, version: int) -> float | None:
        """When an advisory version was stored (epoch seconds), or None."""
        at = await self._read(lambda conn: self._value(conn, advisories.c.received_at, advisory_id, version))
        return None if at is None else aware(at).timestamp()

    async def published(
        self, advisory_id: str | None = None, limit: int = 500, any_state: bool = False
    ) -> list[tuple[Advisory, datetime]]:
        """The newest version of each advisory the public may see — active or completed (a cancel
        too), not expired — with when it was stored; newest first. One advisory if ``advisory_id``;
        ``any_state``: whatever its state and expiry (what a reference names)."""
        q = (
            _newest_only(sa.select(advisories.c.id, advisories.c.version, advisories.c.received_at))
            .order_by(advisories.c.received_at.desc())
            .limit(limit)
        )
        if not any_state:
            q = q.where(
                advisories.c.state.in_([A.ACTIVE.value, A.COMPLETED.value]),
                advisories.c.expires_at > now(),
                advisories.c.training == sa.false(),  # a rehearsal is never public
            )
        if advisory_id is not None:
            q = q.where(advisories.c.id == advisory_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        out = []
        for advisory_id_, version, received in rows:
            adv = await self.advisory(str(advisory_id_), int(version))
            if adv is not None:
                out.append((adv, aware(received)))
        return out

    async def plan_finished(self, advisory_id: str, version: int) -> bool:
        return bool(
            await self._read(lambda conn: self._value(conn, advisories.c.planned, advisory_id, version))
        )

    async def mark_planned(self, advisory_id: str, version: int) -> None:
        await self._set_advisory(advisory_id, version, planned=True)

    async def page_published(self, advisory_id: str, version: int, cursor: str) -> None:
        """A planned page is on the topic: the advisory's planning cursor moves past it."""
        await self._set_advisory(advisory_id, version, plan_cursor=cursor)

    async def planning_cursor(self, advisory_id: str, version: int, planner: str) -> str | None:
        """The stored planning cursor of an advisory version, if ``planner`` may plan it (nobody holds
        the lease, ``planner`` does, or the holder's has run out); None if another instance holds it."""
        t = advisories.c
        q = sa.select(t.plan_cursor).where(
            t.id == advisory_id, t.version == version, _lease_free(planner, now())
        )
        cursor = await self._read(lambda conn: conn.execute(q).scalar_one_or_none())
        return None if cursor is None else str(cursor)

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

    async def release_planning(self, planner: str) -> None:
        """Give up every lease ``planner`` holds (a graceful stop): another instance goes on at once."""
        async with self._begin() as conn:
            await conn.execute(
                sa.update(advisories).where(advisories.c.planner == planner).values(plan_lease_until=now())
            )

    async def unplanned(self) -> list[tuple[str, int, str]]:
        """Active advisories whose planning has not finished: (id, version, cursor to resume after)."""
        q = sa.select(advisories.c.id, advisories.c.version, advisories.c.plan_cursor).where(
            advisories.c.state == A.ACTIVE.value,
            advisories.c.planned == sa.false(),
            advisories.c.msg_type != "cancel",
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [(str(i), int(v), str(c)) for i, v, c in rows]

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
            q = sa.select(deliveries.c.id).where(deliveries.c.id.in_(sorted(ids)))
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
        q = (
            sa.select(t.id, t.channel, t.attempts, t.language, *_CONTACT)
            .join(recipients, recipients.c.id == t.recipient_id)
            .where(t.id.in_(list(ids)), _IS_PENDING)
        )
        if claim is not None:
            at = now()
            async with self._begin() as conn:
                await self._lock(conn, ids)
                await conn.execute(
                    sa.update(deliveries)
                    .where(
                        t.id.in_(list(ids)),
                        _IS_PENDING,
                        sa.or_(t.claimed_by.is_(None), t.claimed_by == claim, t.claimed_until < at),
                    )
                    .values(claimed_by=claim, claimed_until=at + timedelta(seconds=lease_s))
                )
                rows = await conn.run_sync(_lists, q.where(t.claimed_by == claim))
        else:
            rows = await self._read(partial(_lists, q=q))
        return [WorkItem(r[0], r[1], r[2], r[3], Contact(*r[4:])) for r in rows]

    async def renew_claims(self, ids: Sequence[str], claim: str, lease_s: float) -> None:
        """Extend ``claim``'s hold on those of ``ids`` it still holds and that are still pending."""
        t = deliveries.c
        async with self._begin() as conn:
            await self._lock(conn, ids)  # in id order, as every writer of several deliveries
            await conn.execute(
                sa.update(deliveries)
                .where(t.id.in_(list(ids)), t.claimed_by == claim, _IS_PENDING)
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
        rows = sa.values(
            sa.column("b_id", sa.String),
            sa.column("b_partner", sa.String),
            sa.column("b_reason", sa.String),
            name="moved",
        ).data(params)
        batch = _moved(
            status,
            attempted,
            rows.c.b_id,
            rows.c.b_partner,
            rows.c.b_reason,
            sa.literal(at, deliveries.c.updated_at.type),
            receipt,
        )
        return int((await conn.execute(batch)).rowcount)

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

    async def recipients_by_id(self, ids: Sequence[str]) -> list[Contact]:
        q = sa.select(*_CONTACT).where(recipients.c.id.in_(list(ids)))
        return [Contact(*row) for row in await self._read(partial(_lists, q=q))]

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
                partner_refs.c.channel == channel, partner_refs.c.partner_id.in_(unmatched)
            )
            items = _matched(items, {str(p): str(i) for p, i in (await conn.execute(q)).all()})
        ranks_q = (
            sa.select(deliveries.c.id, deliveries.c.rank, deliveries.c.sent_at, deliveries.c.status)
            .where(deliveries.c.id.in_(sorted({o.delivery_id for o in items if o.delivery_id})))
            .order_by(deliveries.c.id)
            .with_for_update()  # PostgreSQL: concurrent batches for one delivery take turns
        )
        found = [
            (str(i), int(r), aware(t) if t is not None else None, str(st))
            for i, r, t, st in (await conn.execute(ranks_q))
        ]
        applied = _Receipted.of(items, found)
        by_status = _by_status(_last_per_delivery(applied.moved))
        await self._record_in(conn, by_status, at, attempted=False, locked=True, receipt=True)
        if applied.known:
            rows = [(o.delivery_id, channel, o.status.value, o.partner_id, at) for o in applied.known]
            await conn.execute(
                sa.insert(receipts), [dict(zip(_RECEIPT_COLUMNS, r, strict=True)) for r in rows]
            )
        return applied

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

    async def counts(self, advisory_id: str | None = None) -> dict[str, dict[str, int]]:
        """channel -> status -> count, for one advisory or for all — from the counters (no scan)."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for row in await self.progress(advisory_id):
            per = out[row.channel]
            per[row.status] = per.get(row.status, 0) + row.n
        return dict(out)

    async def progress(self, advisory_id: str | None = None) -> list[Count]:
        """The counters, per version × channel × language × status (none at zero): what is folded
        in ``delivery_counts`` plus what PostgreSQL's triggers appended since (one statement, one
        snapshot). Costs the same whatever the number of deliveries."""
        parts = []
        for table in (delivery_counts, delivery_count_deltas):
            q = sa.select(*(getattr(table.c, c) for c in COUNT_KEY), table.c.n)
            if advisory_id is not None:
                q = q.where(table.c.advisory_id == advisory_id)
            parts.append(q)
        both = sa.union_all(*parts).subquery()
        key_ = [getattr(both.c, c) for c in COUNT_KEY]
        total = sa.func.sum(both.c.n)
        q = sa.select(*key_, total).group_by(*key_).having(total != 0).order_by(*key_)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_count(r) for r in rows]

    async def recount(self, advisory_id: str | None = None) -> list[Count]:
        """The same as ``progress`` by a full scan of the deliveries: what the counters must agree
        with (tests, ``db recount``). Costs a scan — never on a live view."""
        key_ = [getattr(deliveries.c, c) for c in COUNT_KEY]
        q = sa.select(*key_, sa.func.count()).group_by(*key_).order_by(*key_)
        if advisory_id is not None:
            q = q.where(deliveries.c.advisory_id == advisory_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_count(r) for r in rows]

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
                .values(status=status.value, reason=reason[:500], updated_at=now())
            )

    async def segment_retry(self, seg_id: str, reason: str) -> int:
        """An attempt that will be retried; returns the attempts made so far."""
        t = segment_deliveries.c
        async with self._begin() as conn:
            await conn.execute(
                sa.update(segment_deliveries)
                .where(t.id == seg_id, t.status == Status.PLANNED.value)
                .values(attempts=t.attempts + 1, reason=reason[:500], updated_at=now())
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
                    reason=reason,
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

    # -- delivery events (the outbox) -----------------------------------------------------------

    async def deliver_events(self, enabled: bool) -> None:
        """Create (or drop) the triggers that write every applied status change of a delivery to
        the ``delivery_events`` outbox, in the same transaction as the change. A deployment setting
        (``events.enabled``): every instance should say the same."""
        on = "" if self._dialect == "sqlite" else " ON deliveries"
        async with self._begin() as conn:
            if enabled:
                for statement in _EVENT_TRIGGERS[self._dialect]:
                    await conn.execute(sa.text(statement))
            else:
                for name in ("insert", "update"):
                    await conn.execute(sa.text(f"DROP TRIGGER IF EXISTS deliveries_evented_{name}{on}"))

    async def take_events(self, limit: int, publish: Callable[[list[Event]], Awaitable[None]]) -> int:
        """The oldest ``limit`` events to ``publish``, then removed from the outbox (only once
        ``publish`` returned: at least once). One taker at a time across instances on PostgreSQL
        (an advisory lock: events of one delivery stay in order); returns how many were taken."""
        take = sa.text(_take_events(self._dialect))
        if self._dialect == "postgresql":
            async with self.engine.begin() as conn:
                if not (await conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(4711006)"))).scalar():
                    return 0  # another instance is publishing
                events = [
                    Event(int(s), str(k), str(d)) for s, k, d in await conn.execute(take, {"limit": limit})
                ]
                if events:
                    await publish(events)
                    seqs = [e.seq for e in events]
                    await conn.execute(sa.delete(delivery_events).where(delivery_events.c.seq.in_(seqs)))
            return len(events)

        # SQLite: the write lock is not held while publishing
        def oldest(conn: sa.Connection) -> list[Event]:
            (doc,) = conn.execute(take, {"limit": limit}).one()
            return [Event(*row) for row in orjson.loads(doc)]

        events = await self._read(oldest)
        if events:
            await publish(events)
            seqs = [e.seq for e in events]
            delete = f"DELETE FROM delivery_events WHERE seq IN ({_marks(len(seqs))})"  # noqa: S608
            await self._write(lambda db: db.execute(delete, seqs))
        return len(events)

    async def fold_counts(self) -> int:
        """Fold the deltas PostgreSQL's triggers appended into ``delivery_counts`` (the sweeper
        does, every interval); returns how many delta rows were folded. One folder at a time (an
        advisory lock), so two instances never add the same delta twice. Nothing to do on SQLite."""
        if self._dialect != "postgresql":
            return 0
        async with self._begin() as conn:
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(4711005)"))
            result = await conn.execute(sa.text(_FOLD))
            return int(result.scalar_one())
