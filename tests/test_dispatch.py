"""Dispatch's own parts: the fair priority queue of each lane and out-of-order offset commits."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from gateway.dispatch import FairQueue, Job, Offsets
from gateway.models import BULK, URGENT, Chunk

TP = TopicPartition("deliveries", 0)


def _job(advisory: str, priority: int, n: int) -> Job:
    return Job(Chunk(advisory, 1, "push", (f"{advisory}-{n}",)), TP, n, priority)


async def test_urgent_jobs_go_first_and_equal_priorities_take_turns() -> None:
    q = FairQueue()
    for n in range(3):
        q.put(_job("bulk-a", BULK, n))
    for n in range(2):
        q.put(_job("bulk-b", BULK, n))
    q.put(_job("urgent", URGENT, 0))
    order = []
    while len(q):
        job = await q.get()
        assert job is not None
        order.append(job.chunk.ids[0])
    assert order == ["urgent-0", "bulk-a-0", "bulk-b-0", "bulk-a-1", "bulk-b-1", "bulk-a-2"]


async def test_a_closed_queue_gives_no_more_jobs() -> None:
    q = FairQueue()
    q.put(_job("a", BULK, 0))
    q.close()
    assert await q.get() is None


def test_offsets_are_committed_only_up_to_the_first_unfinished_chunk() -> None:
    offsets = Offsets()
    for n in range(4):
        offsets.fetched(TP, n)
    offsets.finished(TP, 1)
    offsets.finished(TP, 3)
    assert offsets.take_committable() == {}  # chunk 0 is still being sent
    offsets.finished(TP, 0)
    assert offsets.take_committable() == {TP: 2}  # 0 and 1 done; 2 is not
    offsets.finished(TP, 2)
    assert offsets.take_committable() == {TP: 4}
    assert offsets.take_committable() == {}


async def test_an_urgent_only_taker_gets_the_urgent_job_and_leaves_the_bulk_ones() -> None:
    """Each lane's extra worker: it waits through bulk jobs and takes an urgent one as it comes."""
    q = FairQueue()
    for n in range(3):
        q.put(_job("bulk", BULK, n))
    taking = asyncio.create_task(q.get(urgent_only=True))
    await asyncio.sleep(0)  # it looked, found no urgent job, and waits
    assert not taking.done()
    q.put(_job("urgent", URGENT, 0))
    job = await taking
    assert job is not None
    assert job.chunk.ids == ("urgent-0",)
    assert len(q) == 3  # the bulk jobs are still there for the other workers
    q.close()
    assert await q.get(urgent_only=True) is None
