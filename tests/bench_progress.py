"""Benchmark (not a test): what a progress read costs at N deliveries, and what keeping the counters
costs the writes. Reported in docs/benchmarks.md.

    .venv/bin/python -m tests.bench_progress --deliveries 1000000 [--url URL] [--no-triggers]

Builds a fresh store (SQLite file by default, or ``--url`` to an empty PostgreSQL database), plans
N deliveries of one advisory through the store's own writes (insert, queue, sent, delivered — the
moves dispatch and receipts make, in pages of 2,000), then times ``Store.progress`` (the counters:
what status, the API, the console and the demo read) and ``Store.recount`` (the GROUP BY over every
delivery that progress used to be). ``--no-triggers`` drops the counters' triggers first, to
measure what they cost the writes (progress is then wrong, and says so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from gateway.models import Status
from gateway.store import Outcome, Planned, Store

PAGE = 2000
LANGUAGES = ("kk", "ru", "en")


async def _timed(f: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        await f()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return statistics.median(times)


async def run(n: int, url: str | None, triggers: bool) -> dict[str, object]:
    url = url or f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}"
    store = await Store.open(url)
    try:
        if not triggers:
            async with store.begin_write() as conn:
                for name in ("insert", "update", "delete"):
                    on = "" if store.engine.dialect.name == "sqlite" else " ON deliveries"
                    await conn.execute(sa.text(f"DROP TRIGGER IF EXISTS deliveries_counted_{name}{on}"))
        started = time.perf_counter()
        for start in range(0, n, PAGE):
            planned = [
                Planned(f"r{i:09d}", ("push", "sms-http", "email")[i % 3], Status.PLANNED, LANGUAGES[i % 3])
                for i in range(start, min(n, start + PAGE))
            ]
            ids = await store.insert_deliveries("big-1", 1, planned)
            await store.mark_queued(ids)
            await store.record([Outcome(i, Status.SENT) for i in ids], attempted=True)
            await store.record([Outcome(i, Status.DELIVERED) for i in ids[: len(ids) * 9 // 10]])
        writes_s = time.perf_counter() - started
        unfolded_s = await _timed(lambda: store.progress("big-1"), 5)
        folded = await store.fold_counts()  # PostgreSQL: what the sweeper does every interval
        progress_s = await _timed(lambda: store.progress("big-1"), 20)
        recount_s = await _timed(lambda: store.recount("big-1"), 3)
        agree = await store.progress("big-1") == await store.recount("big-1")
        return {
            "deliveries": n,
            "store": store.engine.dialect.name,
            "triggers": triggers,
            "writes_s": round(writes_s, 2),
            "deliveries_per_s_through_four_moves": round(n / writes_s),
            "progress_read_ms_median": round(progress_s * 1000, 3),
            "deltas_folded": folded,
            "progress_read_ms_before_folding": round(unfolded_s * 1000, 3),
            "recount_ms_median": round(recount_s * 1000, 1),
            "counters_agree": agree,
        }
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deliveries", type=int, default=10_000)
    p.add_argument("--url")
    p.add_argument("--no-triggers", action="store_true")
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.deliveries, a.url, not a.no_triggers))))


if __name__ == "__main__":
    main()
