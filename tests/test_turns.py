"""Urgent work first on the event loop (gateway/turns.py UrgentFirst): bulk steps wait while urgent
work is in hand, go on when it is released, and do not stop behind urgent work stuck past its grace."""

from __future__ import annotations

import asyncio

from gateway.models import URGENT, Advisory, Recipient
from gateway.planner import Planner, _Plan
from gateway.store import Store
from gateway.turns import UrgentFirst
from tests.conftest import advisory, own_topics


async def _parked(task: asyncio.Task[None]) -> bool:
    """True if ``task`` is still waiting once everything ready to run has run."""
    for _ in range(5):
        await asyncio.sleep(0)
    return not task.done()


async def test_bulk_waits_while_urgent_work_is_in_hand_and_goes_when_it_is_released() -> None:
    first = UrgentFirst(grace_s=60)
    await asyncio.wait_for(first.bulk_turn(), 5)  # nothing held: no wait
    a, b = first.hold(), first.hold()
    bulk = asyncio.create_task(first.bulk_turn())
    assert await _parked(bulk)
    first.release(a)
    assert await _parked(bulk)  # the other urgent work is still in hand
    first.release(b)
    await asyncio.wait_for(bulk, 5)


async def test_urgent_work_held_past_its_grace_no_longer_stops_bulk() -> None:
    first = UrgentFirst(grace_s=0.05)
    first.hold()  # never released: say its partner is down and it is retried
    await asyncio.wait_for(first.bulk_turn(), 5)
    with first.holding():  # newer urgent work counts again
        bulk = asyncio.create_task(first.bulk_turn())
        assert await _parked(bulk)
    await asyncio.wait_for(bulk, 5)


async def test_a_bulk_page_is_planned_only_after_the_urgent_advisory_in_hand(
    store: Store, kafka_bootstrap: str
) -> None:
    people = [Recipient(id=f"r{i:04d}", app_user=f"app-{i}", country="XA") for i in range(20)]
    await store.upsert_recipients(people)
    urgent = Advisory.model_validate(advisory())
    bulk = Advisory.model_validate(advisory(severity="moderate", urgency="expected"))
    assert urgent.priority == URGENT
    assert bulk.priority != URGENT
    for adv in (urgent, bulk):
        await store.accept(adv, adv.model_dump(mode="json"), {})
    async with own_topics(kafka_bootstrap) as (topics, producer):
        planner = Planner(store, producer, topics, 10, {"push": "push"}, urgent_first=UrgentFirst(60))
        planner.submit(urgent)  # in hand from now until it is planned
        bulk_plan = _Plan(bulk, "")
        bulk_page = asyncio.create_task(planner.plan_page(bulk_plan))
        assert await _parked(bulk_page)
        assert bulk_plan.cursor == ""
        urgent_plan = _Plan(urgent, "")
        await planner.plan_page(urgent_plan)
        await planner.plan_page(urgent_plan)
        assert urgent_plan.cursor == "r0019"  # both its pages planned; it is still in hand
        assert await store.recount(bulk.id) == []  # the bulk page has not been planned meanwhile
        await planner.plan_page(urgent_plan)  # an empty page: planned, no longer in hand
        assert await store.plan_finished(urgent.id, 1)
        await asyncio.wait_for(bulk_page, 30)
        assert bulk_plan.cursor == "r0009"  # its first page, planned once the urgent one was done
