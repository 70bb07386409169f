"""The delivery counters (gateway/store/counts.py, migration 0005) on SQLite and PostgreSQL: whatever moves
the deliveries — planning, queueing, results, retries, receipts (in and out of order), expiry, the
silent-receipt sweep, an operator's replay of failures, an operator's cancel — and however many
writers at once, the counters agree with a full recount; and reading them never reads a delivery."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from gateway.models import Recipient, Status, now
from gateway.schema import advisories, delivery_count_deltas
from gateway.store import Outcome, Planned, Store

CHANNELS = ("push", "sms-http", "email")
LANGUAGES = ("kk", "ru", "en")
MOVES = (Status.SENT, Status.DELIVERED, Status.READ, Status.FAILED, Status.CANCELLED, Status.EXPIRED)


async def _stored_advisory(store: Store, advisory_id: str, version: int, expires_in_s: float) -> None:
    at = now()
    async with store.begin_write() as conn:
        await conn.execute(
            sa.insert(advisories).values(
                id=advisory_id,
                version=version,
                msg_type="alert",
                sender="mfa.example",
                priority=1,
                expires_at=at + timedelta(seconds=expires_in_s),
                state="active",
                body={},
                received_at=at,
            )
        )


def _planned(n: int, rng: random.Random) -> list[Planned]:
    return [
        Planned(
            f"r{i}",
            rng.choice(CHANNELS),
            rng.choice((Status.PLANNED, Status.PLANNED, Status.SKIPPED)),
            rng.choice(LANGUAGES),
        )
        for i in range(n)
    ]


async def _made(store: Store, advisory_id: str, version: int, n: int, rng: random.Random) -> list[str]:
    """``n`` deliveries of an advisory version made in the store (random channels, languages,
    statuses), in pages of 100; their ids."""
    planned = _planned(n, rng)
    ids: list[str] = []
    for start in range(0, n, 100):
        ids += await store.insert_deliveries(advisory_id, version, planned[start : start + 100])
    return ids


async def _random_moves(
    store: Store, ids: list[str], rng: random.Random, rounds: int, replay: tuple[str, int, list[Planned]]
) -> None:
    for _ in range(rounds):
        some = rng.sample(ids, k=rng.randint(1, 40))
        move = rng.randrange(5)
        if move == 0:
            await store.mark_queued(some)
        elif move == 1:
            await store.record(
                [Outcome(i, rng.choice(MOVES), reason="test") for i in some], attempted=rng.random() < 0.5
            )
        elif move == 2:
            await store.apply_receipts(
                rng.choice(CHANNELS), [Outcome(i, rng.choice(MOVES[1:4])) for i in some + some[:5]]
            )
        elif move == 3:
            await store.note_retry(some, "retry")
        else:  # a replayed page: the deliveries made before are left alone, and their ids come back
            advisory_id, version, planned = replay
            start = rng.randrange(len(planned))
            again = await store.insert_deliveries(advisory_id, version, planned[start : start + 40])
            assert len(set(again)) == len(again)
            assert set(again) <= set(ids)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_counters_agree_with_a_full_recount_whatever_moved_the_deliveries(
    store: Store, seed: int
) -> None:
    await store.upsert_recipients([Recipient(id=f"r{i}", country="XA") for i in range(300)])
    await _stored_advisory(store, "a", 1, expires_in_s=3600)
    await _stored_advisory(store, "a", 2, expires_in_s=3600)
    await _stored_advisory(store, "gone", 1, expires_in_s=-1)  # expired: the sweeper's to withdraw
    ids: list[str] = []
    for advisory_id, version in (("a", 1), ("a", 2), ("gone", 1)):
        ids += await _made(store, advisory_id, version, 300, random.Random(f"{seed}{advisory_id}{version}"))
    replay = ("a", 2, _planned(300, random.Random(f"{seed}a2")))  # what made a@v2, planned again
    # four writers at once (on PostgreSQL truly concurrent transactions)
    await asyncio.gather(
        *(_random_moves(store, ids, random.Random(seed * 10 + w), 25, replay) for w in range(4))
    )
    await store.requeue_failed("a", None, 50)
    await store.expire_pending(now())
    await store.mark_unknown(now() + timedelta(seconds=1))
    await store.cancel("a", "token:t1:duty-operator", "wrong crossing named")

    recount = await store.recount()
    assert await store.progress() == recount
    assert sum(c.n for c in recount) == len(ids)
    assert {c.language for c in recount} == set(LANGUAGES)
    assert await store.fold_counts() >= 0  # PostgreSQL: deltas folded in, nothing added twice
    assert await store.progress() == recount
    for advisory_id in ("a", "gone"):
        assert await store.progress(advisory_id) == [c for c in recount if c.advisory_id == advisory_id]


async def test_the_counters_fold_on_postgresql_and_stay_exact(store: Store) -> None:
    await _stored_advisory(store, "a", 1, expires_in_s=3600)
    await store.mark_queued(await _made(store, "a", 1, 200, random.Random(7)))
    async with store.engine.connect() as conn:
        deltas = (await conn.execute(sa.select(sa.func.count()).select_from(delivery_count_deltas))).scalar()
    folded = await store.fold_counts()
    assert folded == deltas  # SQLite keeps no deltas: 0 == 0
    if store.engine.dialect.name == "postgresql":
        assert folded > 0
    async with store.engine.connect() as conn:
        left = (await conn.execute(sa.select(sa.func.count()).select_from(delivery_count_deltas))).scalar()
    assert left == 0
    assert await store.progress("a") == await store.recount("a")


async def test_reading_progress_never_reads_a_delivery(store: Store) -> None:
    """What keeps a progress read at the same cost at 100 or 10,000,000 deliveries: the query plan
    touches the counters only (measured: docs/benchmarks.md)."""
    await _stored_advisory(store, "a", 1, expires_in_s=3600)
    await _made(store, "a", 1, 50, random.Random(1))
    captured: list[str] = []

    def capture(conn: object, cursor: object, statement: str, *args: object) -> None:
        captured.append(statement)

    sa.event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        await store.progress("a")
        await store.counts("a")
    finally:
        sa.event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
    assert captured
    assert all("delivery_counts" in s for s in captured)
    assert not any(" deliveries" in s.replace("\n", " ") for s in captured), captured


async def test_the_outbox_holds_every_applied_change_in_order_and_empties_as_it_is_published(
    store: Store,
) -> None:
    """The delivery events' outbox (gateway/events.py), filled by the same kind of triggers: replaying
    each delivery's events from planned gives exactly its stored status, on SQLite and PostgreSQL,
    with writers at once."""
    await store.deliver_events(True)
    await _stored_advisory(store, "a", 1, expires_in_s=3600)
    ids = await _made(store, "a", 1, 200, random.Random(5))
    replay = ("a", 1, _planned(200, random.Random(5)))
    await asyncio.gather(*(_random_moves(store, ids, random.Random(50 + w), 15, replay) for w in range(3)))
    published: list[object] = []

    async def publish(events: list[object]) -> None:
        published.extend(events)

    while await store.take_events(64, publish):
        pass
    assert await store.take_events(64, publish) == 0  # emptied
    last: dict[str, str] = {}
    for e in (json.loads(p.doc) for p in published):  # type: ignore[attr-defined]
        assert e["previous_status"] == last.get(e["delivery_id"]), e
        assert e["schema"] == "delivery-event/1"
        assert datetime.fromisoformat(e["at"]).utcoffset() == timedelta(0)  # RFC 3339, UTC
        last[e["delivery_id"]] = e["status"]
    for i in ids:
        assert last[i] == (await store.delivery(i) or {}).get("status")
    await store.deliver_events(False)
    await store.mark_queued(ids)
    assert await store.take_events(64, publish) == 0  # no triggers: no events


async def test_the_advisory_pages_figures_failure_reasons_and_sent_within_10_s(store: Store) -> None:
    await _stored_advisory(store, "a", 1, expires_in_s=3600)
    ids = await store.insert_deliveries("a", 1, [Planned(f"r{i}", "push", Status.PLANNED) for i in range(6)])
    await store.record(
        [Outcome(i, Status.FAILED, reason="partner answered 400: unknown user") for i in ids[:3]]
    )
    await store.record([Outcome(ids[3], Status.FAILED, reason="attempts exhausted (5): 503")])
    await store.record([Outcome(i, Status.SENT) for i in ids[4:]], attempted=True)
    assert await store.failure_reasons("a", 1) == [
        ("push", "partner answered 400: unknown user", 3),
        ("push", "attempts exhausted (5): 503", 1),
    ]
    assert await store.sent_within("a", 1, 10.0) == (2, 2)  # sent just now, stored just now
    assert await store.sent_within("a", 1, -60.0) == (2, 0)
    assert await store.sent_within("missing", 1, 10.0) == (0, 0)
