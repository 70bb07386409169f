"""The same store queries on PostgreSQL (skipped when absent on a laptop; required when CI=true)."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from gateway.models import Recipient, Status
from gateway.store import Outcome, Planned, Store
from tests.conftest import fresh_postgres_database


async def test_store_round_trip_and_rank_guard_on_postgresql() -> None:
    async with fresh_postgres_database() as url:
        await _round_trip(await Store.open(url))


async def _round_trip(store: Store) -> None:
    try:
        rid = f"pg-{uuid.uuid4().hex[:6]}"
        await store.upsert_recipients(
            [Recipient(id=rid, languages=("kk",), app_user="u", country="XA", tags=("a",))]
        )
        await store.upsert_recipients(
            [Recipient(id=rid, languages=("ru",), app_user="u", country="XA", tags=("a",))]
        )
        (r,) = await store.audience_page(["XA"], [], ["a"], "", 10)
        assert r.languages == ("ru",)
        planned = [Planned(rid, "push", Status.PLANNED)]
        [d1] = await store.insert_deliveries("adv", 1, planned)
        assert await store.insert_deliveries("adv", 1, planned) == [d1]  # a replay makes nothing new
        await store.mark_queued([d1])
        assert [w.delivery_id for w in await store.pending_work([d1])] == [d1]
        await store.record([Outcome(d1, Status.SENT, partner_id="p1")], attempted=True)
        await store.apply_receipts("push", [Outcome(d1, Status.READ), Outcome(d1, Status.DELIVERED)])
        assert (await store.delivery(d1) or {}).get("status") == "read"
        assert await store.counts("adv") == {"push": {"read": 1}}
        async with store.engine.connect() as conn:
            attempts = (
                await conn.execute(sa.text("select attempts from deliveries where id = :id"), {"id": d1})
            ).scalar_one()
        assert attempts == 1
    finally:
        await store.close()
