"""Benchmark (not a test): the most a SQLite store of this schema can do for a broadcast, with no
gateway around it — the store's own statements, run straight on the driver in one thread. Reported
in docs/performance.md ("What bounds each figure").

    .venv/bin/python -m tests.bench_sqlite_ceiling --deliveries 100000 [--no-events] [--no-counters]

A fresh SQLite file with the current migrations and the gateway's pragmas (Store.open), then per page
of 500 deliveries, each in its own transaction and with the statements the gateway's SQLite writer
runs: made (queued), sent (with the partner's id), delivered plus the receipt row, and the events
outbox read and emptied. ``--no-events`` / ``--no-counters`` drop those triggers first. Prints one
JSON line: seconds per step and deliveries per second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from gateway.models import Status, now
from gateway.store import Outcome, Planned, Store
from gateway.store.deliveries import _by_status, _hashes, _sqlite_make, _sqlite_record
from gateway.store.receipts import _SQLITE_RECEIPT
from gateway.store.sqlite import SQLITE_PRAGMAS, _sqlite_insert, _sqlite_time

PAGE = 500


async def _schema(path: Path, events: bool) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{path}")
    await store.deliver_events(events)
    await store.close()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in SQLITE_PRAGMAS:  # as the store's connections have them
        db.execute(f"PRAGMA {pragma}")
    return db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction, as the store's each write is (the connection itself autocommits)."""
    db.execute("BEGIN")
    yield
    db.execute("COMMIT")


def run(n: int, events: bool, counters: bool) -> dict[str, object]:
    path = Path(tempfile.mkdtemp()) / "ceiling.db"
    asyncio.run(_schema(path, events))
    db = _connect(path)
    if not counters:
        for name in ("insert", "update", "delete"):
            db.execute(f"DROP TRIGGER IF EXISTS deliveries_counted_{name}")
    steps = dict.fromkeys(("insert", "sent", "delivered", "events"), 0.0)
    started = time.perf_counter()
    for start in range(0, n, PAGE):
        planned = [
            Planned(f"r{i:09d}", "push", Status.QUEUED, "ru") for i in range(start, min(n, start + PAGE))
        ]
        at = now()
        stamp = _sqlite_time(at)
        marks = [time.perf_counter()]
        with _transaction(db):
            ids = _sqlite_make(db, "big", 1, planned, _hashes("big", 1, planned), stamp)
        marks.append(time.perf_counter())
        with _transaction(db):
            sent = (Outcome(i, Status.SENT, partner_id=f"m{start + k}") for k, i in enumerate(ids))
            _sqlite_record(db, _by_status(sent), at, attempted=True)
        marks.append(time.perf_counter())
        with _transaction(db):
            _sqlite_record(db, _by_status(Outcome(i, Status.DELIVERED) for i in ids), at, attempted=False)
            _sqlite_insert(db, _SQLITE_RECEIPT, [(i, "push", "delivered", None, stamp) for i in ids])
        marks.append(time.perf_counter())
        while events:
            seqs = [s for (s,) in db.execute("SELECT seq FROM delivery_events ORDER BY seq LIMIT 2000")]
            if not seqs:
                break
            with _transaction(db):
                db.execute(f"DELETE FROM delivery_events WHERE seq IN ({','.join('?' * len(seqs))})", seqs)  # noqa: S608
        marks.append(time.perf_counter())
        for step, (a, b) in zip(steps, itertools.pairwise(marks), strict=True):
            steps[step] += b - a
    seconds = time.perf_counter() - started
    db.close()
    return {
        "deliveries": n,
        "events": events,
        "counters": counters,
        "seconds": round(seconds, 2),
        "per_s": round(n / seconds),
        "steps_s": {k: round(v, 2) for k, v in steps.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deliveries", type=int, default=100_000)
    p.add_argument("--no-events", action="store_true")
    p.add_argument("--no-counters", action="store_true")
    a = p.parse_args()
    print(json.dumps(run(a.deliveries, not a.no_events, not a.no_counters)))


if __name__ == "__main__":
    main()
