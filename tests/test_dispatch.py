"""Dispatch's own parts: the fair priority queue of each lane, out-of-order offset commits, and a
chunk's messages made from its work."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

from aiokafka import TopicPartition

from channels.push import PushAdapter, PushSettings
from gateway.dispatch import Dispatcher, FairQueue, Job, Offsets
from gateway.models import BULK, URGENT, Advisory, Chunk, Contact, Status
from gateway.rendering import Renderer
from gateway.settings import DispatchSettings
from gateway.store import Outcome, Store, WorkItem
from tests.conftest import advisory

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


def test_a_chunk_is_rendered_a_language_at_a_time_in_the_language_chosen_at_planning(tmp_path: Path) -> None:
    """Each message in the language its delivery was planned (and is counted) in, whatever the
    recipient's chain says now; a rendering that does not read the recipient made once a language
    and shared; one that does, made for each recipient; a recipient without an address fails alone."""
    for lang, title, body in (
        ("en", "Leave now", "You are registered in {{ recipient.region }}."),
        ("kk", "Кетіңіз", "Елден кетіңіз."),
    ):
        folder = tmp_path / "personal" / lang
        folder.mkdir(parents=True)
        (folder / "push.title.j2").write_text(title, encoding="utf-8")
        (folder / "push.body.j2").write_text(body, encoding="utf-8")
    dispatcher = Dispatcher(cast(Store, None), Renderer(tmp_path, "en"), {}, DispatchSettings(), {})
    adapter = PushAdapter("push", PushSettings(adapter="push", secret="x"), None)  # type: ignore[arg-type]
    adv = Advisory.model_validate(advisory(template="personal", data={}))

    def work(delivery: str, planned: str, app_user: str | None, region: str) -> WorkItem:
        return WorkItem(
            delivery, "push", 0, planned, Contact(delivery, "en", None, None, app_user, "XA", region, "", "")
        )

    items = [
        work("d1", "kk", "u1", "north"),  # the chain says en now; planned in kk
        work("d2", "kk", "u2", "north"),
        work("d3", "en", "u3", "south"),
        work("d4", "en", None, "south"),  # no super-app user any more
        work("d5", "en", "u5", "east"),
    ]
    messages, failed = dispatcher._messages(adv, adapter, items)
    assert [(m.delivery_id, m.language, m.address) for m in messages] == [
        ("d1", "kk", "u1"),
        ("d2", "kk", "u2"),
        ("d3", "en", "u3"),
        ("d5", "en", "u5"),
    ]
    assert messages[0].parts is messages[1].parts  # one rendering for the language
    assert [m.parts["body"] for m in messages[2:]] == [
        "You are registered in south.",
        "You are registered in east.",
    ]
    assert failed == [Outcome("d4", Status.FAILED, reason="recipient has no push address")]
