"""Planner: the store is its schedule — an advisory stored by any intake (here: straight into the
store, as another gateway process's intake would) is planned and sent without a restart; with
several instances one plans an advisory at a time, and another takes over where it stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import sqlalchemy as sa

from gateway import metrics
from gateway.app import Gateway
from gateway.lifecycle import AdvisoryState
from gateway.models import Advisory, Contact, Recipient
from gateway.planner import Planner, _Plan
from gateway.sandbox.process import SandboxProcess
from gateway.store import Store
from tests.conftest import advisory, eventually, load_recipients, own_topics, reached


async def test_an_advisory_stored_by_another_process_is_planned_without_a_restart(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    await load_recipients(gateway, tmp_path, 50)
    assert gateway.store is not None
    adv = Advisory.model_validate(advisory())
    accepted = await gateway.store.accept(adv, adv.model_dump(mode="json"), {})
    assert accepted.state is AdvisoryState.ACTIVE
    await eventually(lambda: reached(gateway, adv.id, "delivered", 50), what="planned, sent and delivered")
    assert await gateway.store.plan_finished(adv.id, 1)


async def test_one_instance_plans_an_advisory_and_another_takes_over_where_it_stopped(
    store: Store, kafka_bootstrap: str
) -> None:
    """Two planners (two instances) on one store: only the lease holder plans pages; when its lease
    runs out (it died) the other goes on from the stored cursor — no page is planned twice."""
    people = [Recipient(id=f"r{i:04d}", app_user=f"app-{i}", country="XA") for i in range(30)]
    await store.upsert_recipients(people)
    adv = Advisory.model_validate(advisory())
    await store.accept(adv, adv.model_dump(mode="json"), {})
    planned = metrics.deliveries_planned_total.labels("push")
    async with own_topics(kafka_bootstrap) as (topics, producer):
        # the first instance's lease is over as soon as it is taken: it "died" after each page
        first = Planner(store, producer, topics, 10, {"push": "push"}, lease_s=-1.0)
        second = Planner(store, producer, topics, 10, {"push": "push"}, lease_s=60.0)
        before = planned._value.get()
        page = _Plan(adv, "")
        await first.plan_page(page)
        assert page.cursor == "r0009"
        assert planned._value.get() - before == 10

        takeover = _Plan(adv, "")  # the second instance's schedule knew nothing of that page
        await second.plan_page(takeover)
        assert takeover.cursor == "r0019"  # it went on after the stored cursor, not from the start
        assert planned._value.get() - before == 20

        again = _Plan(adv, "r0009")
        await first.plan_page(again)  # the second holds the lease now: the first plans nothing
        assert again.cursor == "r0009"
        assert planned._value.get() - before == 20

        await second.plan_page(takeover)
        await second.plan_page(takeover)  # an empty page: planning is finished
        assert planned._value.get() - before == 30
        assert await store.plan_finished(adv.id, 1)
        assert await store.recount() == await store.progress()


async def test_a_released_lease_is_taken_at_once_and_a_held_one_is_not(store: Store) -> None:
    adv = Advisory.model_validate(advisory())
    await store.accept(adv, adv.model_dump(mode="json"), {})
    assert await store.planning_cursor(adv.id, 1, "a") == ""
    assert await store.insert_planned(adv.id, 1, [], "a", 60, after="") == []  # the lease taken with a page
    assert await store.planning_cursor(adv.id, 1, "b") is None
    assert await store.insert_planned(adv.id, 1, [], "b", 60, after="") is None
    await store.page_published(adv.id, 1, "r0042")
    assert await store.planning_cursor(adv.id, 1, "a") == "r0042"
    # a page read before the cursor moved is not inserted: the planner reads the cursor again
    assert await store.insert_planned(adv.id, 1, [], "a", 60, after="") is None
    assert await store.insert_planned(adv.id, 1, [], "a", 60, after="r0042") == []  # renewed by its holder
    await store.release_planning("a")  # a graceful stop
    assert await store.planning_cursor(adv.id, 1, "b") == "r0042"
    assert await store.insert_planned(adv.id, 1, [], "b", 60, after="r0042") == []
    assert await store.planning_cursor(adv.id, 1, "a") is None


async def test_the_next_page_is_read_while_one_is_made_and_a_failed_read_is_read_again(
    store: Store, kafka_bootstrap: str
) -> None:
    """Each page is read while the one before is written and published (a page's steps were one
    after another: the read, then the write's turn, then the broker's acknowledgement). A read ahead
    that fails is read again in the next turn: every recipient is planned, once."""
    people = [Recipient(id=f"r{i:04d}", app_user=f"app-{i}", country="XA") for i in range(25)]
    await store.upsert_recipients(people)
    adv = Advisory.model_validate(advisory())
    await store.accept(adv, adv.model_dump(mode="json"), {})
    steps: list[str] = []
    read, insert = store.audience_page, store.insert_planned
    failing = {"r0019"}  # the read after this cursor fails once

    async def audience_page(*args: Any) -> list[Contact]:
        cursor = args[3]
        steps.append(f"read after {cursor or 'start'}")
        if cursor in failing:
            failing.discard(cursor)
            raise sa.exc.OperationalError("SELECT …", None, Exception("the store is away"))
        return await read(*args)

    async def insert_planned(*args: Any, **kwargs: Any) -> list[str] | None:
        ids = await insert(*args, **kwargs)
        steps.append(f"{len(args[2])} made")
        return ids

    with (
        patch.object(store, "audience_page", audience_page),
        patch.object(store, "insert_planned", insert_planned),
    ):
        async with own_topics(kafka_bootstrap) as (topics, producer):
            planner = Planner(store, producer, topics, 10, {"push": "push"}, page_size=10)
            plan = _Plan(adv, "")
            await planner.plan_page(plan)
            assert steps == ["read after start", "read after r0009", "10 made"]
            await planner.plan_page(plan)  # the page read ahead: no read of its own
            assert steps[3:] == ["read after r0019", "10 made"]
            with pytest.raises(sa.exc.OperationalError):
                await planner.plan_page(plan)  # the read ahead failed: this turn fails, as a read would
            await planner.plan_page(plan)
            await planner.plan_page(plan)  # nothing after r0024 (read ahead): planning is finished
    assert steps[5:] == ["read after r0019", "read after r0024", "5 made"]
    assert await store.plan_finished(adv.id, 1)
    assert {c.status: c.n for c in await store.progress() if c.n} == {"queued": 25}
