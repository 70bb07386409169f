"""A partner's pace (channels/pacing.py): its rate and its open requests are kept, and an urgent
batch waiting for either goes before the bulk batches that were waiting already."""

from __future__ import annotations

import asyncio

from channels.pacing import Pace, Slots
from gateway.models import BULK, URGENT


async def test_waiting_urgent_batches_take_the_next_tokens_before_waiting_bulk_ones() -> None:
    pace = Pace(rate_per_s=200, burst=10)
    order: list[str] = []

    async def take(name: str, priority: int) -> None:
        await pace.acquire(10, priority)
        order.append(name)

    await take("first", BULK)  # the bucket starts full: at once
    waiting = [asyncio.create_task(take(f"bulk{i}", BULK)) for i in range(3)]
    await asyncio.sleep(0)  # let them queue (an event-loop turn, not a wait for time)
    waiting.append(asyncio.create_task(take("urgent", URGENT)))
    await asyncio.gather(*waiting)
    assert order == ["first", "urgent", "bulk0", "bulk1", "bulk2"]


async def test_the_rate_is_kept_whatever_the_priorities() -> None:
    """Five batches of 10 at 200/s with a burst of 10: the last cannot go before 40 tokens refilled."""
    pace = Pace(rate_per_s=200, burst=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(pace.acquire(10, URGENT if i % 2 else BULK) for i in range(5)))
    assert loop.time() - started >= 40 / 200 - 0.01


async def test_a_waiter_cancelled_in_the_line_holds_up_nobody() -> None:
    pace = Pace(rate_per_s=200, burst=10)
    await pace.acquire(10, BULK)
    gone = asyncio.create_task(pace.acquire(10, URGENT))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.wait_for(pace.acquire(10, BULK), 1.0)  # served when its own tokens are there
    assert gone.cancelled()


async def test_a_free_slot_goes_to_the_waiting_urgent_batch_first() -> None:
    slots = Slots(1)
    order: list[str] = []
    release = asyncio.Event()

    async def hold(name: str, priority: int, until: asyncio.Event | None = None) -> None:
        async with slots.held(priority):
            order.append(name)
            if until is not None:
                await until.wait()

    holder = asyncio.create_task(hold("holder", BULK, release))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(hold(f"bulk{i}", BULK)) for i in range(2)]
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(hold("cancelled", URGENT))
    waiting.append(asyncio.create_task(hold("urgent", URGENT)))
    await asyncio.sleep(0)
    cancelled.cancel()
    release.set()
    await asyncio.gather(holder, *waiting)
    assert order == ["holder", "urgent", "bulk0", "bulk1"]
    assert slots.free == 1  # every slot given back, the cancelled waiter's too
