"""The delivery events' outbox (gateway/events.py): every applied change of a delivery, written by
triggers in the same transaction; each event's JSON written by the database as it is read."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NamedTuple

import orjson
import sqlalchemy as sa

from gateway.schema import delivery_events
from gateway.store.base import StoreBase, among

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


class OutboxStore(StoreBase):
    """The delivery events' outbox: its triggers, and the oldest events taken out in order."""

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
                    # by number, not a range: a transaction that took a smaller number may commit
                    # after the take, and a DELETE sees what committed since (read committed)
                    taken = among(delivery_events.c.seq, seqs, self._dialect)
                    await conn.execute(sa.delete(delivery_events).where(taken))
            return len(events)

        # SQLite: the write lock is not held while publishing
        def oldest(conn: sa.Connection) -> list[Event]:
            (doc,) = conn.execute(take, {"limit": limit}).one()
            return [Event(*row) for row in orjson.loads(doc)]

        events = await self._read(oldest)
        if events:
            await publish(events)
            # they were the oldest, so they are every event up to the last one taken: a row made
            # since has a greater seq (AUTOINCREMENT: never a number twice, even after the outbox was
            # emptied — migration 0013). One bound instead of 5,000 values bound in the writer's thread
            last = max(e.seq for e in events)
            await self._write(lambda db: db.execute("DELETE FROM delivery_events WHERE seq <= ?", (last,)))
        return len(events)
