"""The delivery counters (migration 0005): progress without a scan of the deliveries."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from gateway.schema import deliveries, delivery_count_deltas, delivery_counts
from gateway.store.base import StoreBase

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


_COLS = ", ".join(COUNT_KEY)
# PostgreSQL: take every delta, add them up per key, add the sums to the counters, in key order
_FOLD = (
    f"WITH folded AS (DELETE FROM delivery_count_deltas RETURNING {_COLS}, n), "  # noqa: S608
    f"summed AS (SELECT {_COLS}, sum(n) AS n, count(*) AS rows_ FROM folded GROUP BY {_COLS}), "
    f"upserted AS (INSERT INTO delivery_counts ({_COLS}, n) SELECT {_COLS}, n FROM summed "
    f"ORDER BY {_COLS} ON CONFLICT ({_COLS}) DO UPDATE SET n = delivery_counts.n + excluded.n) "
    "SELECT coalesce(sum(rows_), 0) FROM summed"
)


def _count(row: Sequence[Any]) -> Count:
    advisory_id, version, channel, language, status, n = row
    return Count(str(advisory_id), int(version), str(channel), str(language), str(status), int(n))


class CountsStore(StoreBase):
    """The delivery counters, and a recount to check them by."""

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
