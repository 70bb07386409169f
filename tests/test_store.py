"""Store behaviour on SQLite and PostgreSQL: statuses only move forward; receipts without our id
find their delivery; only receipts that move a delivery count as moved."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

import phonenumbers
import pytest
import sqlalchemy as sa

from gateway.models import BULK, INVALID_PHONE, URGENT, Recipient, Status, now
from gateway.schema import deliveries, recipients
from gateway.store import AppliedReceipts, Outcome, Planned, Store, working_for
from gateway.store.sqlite import _SQLITE_ROWS


async def _made(store: Store, recipients: list[str], status: Status = Status.QUEUED) -> list[str]:
    """SMPP deliveries of advisory "a" v1 to these recipients (made here), their ids."""
    await store.upsert_recipients([Recipient(id=r, phone="+77011234567", country="XA") for r in recipients])
    return await store.insert_deliveries("a", 1, [Planned(r, "smpp", status) for r in recipients])


async def _one_sent(store: Store) -> str:
    """One SMPP delivery sent, its partner id (smsc-42) kept where receipts find it; its id."""
    [d1] = await _made(store, ["r1"], Status.PLANNED)
    await store.record([Outcome(d1, Status.SENT, partner_id="smsc-42")], attempted=True, refs_channel="smpp")
    return d1


async def test_a_receipt_without_our_id_is_matched_by_the_partner_message_id(store: Store) -> None:
    d1 = await _one_sent(store)
    applied = await store.apply_receipts("smpp", [Outcome("", Status.DELIVERED, partner_id="smsc-42")])
    assert [o.delivery_id for o in applied.moved] == [d1]
    assert (await store.delivery(d1) or {}).get("status") == "delivered"
    applied = await store.apply_receipts("smpp", [Outcome("", Status.DELIVERED, partner_id="unknown")])
    assert (applied.moved, applied.unknown, applied.held) == ([], [], 1)  # its send may not be recorded yet


async def test_a_receipt_that_overtakes_the_record_of_its_partner_id_is_held_then_applied(
    store: Store,
) -> None:
    """An SMSC's DLR (or a relay's event) written before the send's answer that holds its partner
    id: held, not lost; applied on the retry after the answer is recorded. It was dropped as
    unmatched, and the delivery stayed ``sent`` for ever (a bench of 20,000 e-mails with 8 SMTP
    connections left 311 so)."""
    d1, d2 = await _made(store, ["r1", "r2"])
    early = [
        Outcome("", Status.DELIVERED, partner_id="m1"),
        Outcome("", Status.DELIVERED, partner_id="stray"),
    ]
    applied = await store.apply_receipts("smpp", early)
    assert (applied.moved, applied.unknown, applied.held) == ([], [], 2)
    assert await store.apply_held(now() - timedelta(seconds=600)) == [
        ("smpp", AppliedReceipts([], [], 0, [], 2))
    ]  # nothing recorded yet: both still held
    sent = [Outcome(d, Status.SENT, partner_id=p) for d, p in ((d1, "m1"), (d2, "m2"))]
    await store.record(sent, attempted=True, refs_channel="smpp")
    [(channel, retried)] = await store.apply_held(now() - timedelta(seconds=600))
    assert (channel, [o.delivery_id for o in retried.moved], retried.held) == ("smpp", [d1], 1)
    assert (await store.delivery(d1) or {}).get("status") == "delivered"
    assert (await store.delivery(d2) or {}).get("status") == "sent"
    # held longer than hold_s: given up, reported unknown, no longer held
    [(_, given_up)] = await store.apply_held(now() + timedelta(seconds=1))
    assert ([o.partner_id for o in given_up.unknown], given_up.held) == (["stray"], 0)
    assert await store.apply_held(now()) == []


async def test_only_receipts_that_move_a_delivery_are_reported_as_moved(store: Store) -> None:
    """A duplicate or out-of-order receipt is stored but changes nothing: no event is due for it."""
    d1 = await _one_sent(store)
    batch = [Outcome(d1, Status.DELIVERED), Outcome(d1, Status.DELIVERED), Outcome(d1, Status.READ)]
    applied = await store.apply_receipts("smpp", batch)
    assert [o.status for o in applied.moved] == [Status.DELIVERED, Status.READ]
    assert applied.unchanged == 1
    late = await store.apply_receipts("smpp", [Outcome(d1, Status.DELIVERED), Outcome("zz", Status.READ)])
    assert (late.moved, late.unchanged, [o.delivery_id for o in late.unknown]) == ([], 1, ["zz"])
    assert (await store.delivery(d1) or {}).get("status") == "read"


async def test_a_late_write_never_moves_a_delivery_backwards(store: Store) -> None:
    d1 = await _one_sent(store)
    await store.apply_receipts("smpp", [Outcome(d1, Status.READ)])
    assert await store.record([Outcome(d1, Status.SENT)]) == 0
    assert await store.record([Outcome(d1, Status.DELIVERED)]) == 0
    assert (await store.delivery(d1) or {}).get("status") == "read"


async def test_a_receipt_that_overtakes_its_send_result_after_a_withdrawal_is_not_lost(store: Store) -> None:
    """A message on its way when an update withdrew its delivery, whose receipt is written before its
    send result (receipts take their write turn ahead of bulk results): the delivery ends delivered,
    as it does when the result comes first. It once stayed ``sent`` for ever (seen under load in
    tests/test_delivery_guarantees.py's update test)."""
    d1, d2 = await _made(store, ["r1", "r2"])
    await store.record([Outcome(d, Status.CANCELLED, reason="superseded") for d in (d1, d2)])
    receipt = await store.apply_receipts("smpp", [Outcome(d1, Status.DELIVERED, partner_id="p1")])
    assert [o.delivery_id for o in receipt.moved] == [d1]
    await store.record([Outcome(d1, Status.SENT, partner_id="p1")], attempted=True)
    assert (await store.delivery(d1) or {}).get("status") == "delivered"
    # a withdrawn delivery that never went out stays withdrawn: only the partner's word moves it
    assert await store.record([Outcome(d2, Status.FAILED, reason="attempts exhausted")]) == 0
    assert (await store.delivery(d2) or {}).get("status") == "cancelled"


async def test_a_partners_words_are_stored_with_addresses_and_numbers_masked(store: Store) -> None:
    """A relay's or an aggregator's refusal often quotes the address it refused. The reason stored,
    and the delivery event made of it, name no recipient (docs/delivery-events.md): the address and
    the number are masked as the logs mask them; the rest of the partner's words are kept."""
    await store.deliver_events(True)
    d1, d2 = await _made(store, ["r1", "r2"])
    refusal = "550 5.1.1 <aigerim.nurlanovna@example.kz>: Recipient address rejected"
    await store.record([Outcome(d1, Status.FAILED, reason=refusal)], attempted=True)
    await store.record([Outcome(d2, Status.SENT, partner_id="p2")], attempted=True)
    await store.apply_receipts("smpp", [Outcome(d2, Status.FAILED, reason="undeliverable to +77011234567")])
    assert (await store.delivery(d1) or {}).get("reason") == (
        "550 5.1.1 <a***@example.kz>: Recipient address rejected"
    )
    assert (await store.delivery(d2) or {}).get("reason") == "undeliverable to +770*****567"
    published: list[str] = []

    async def publish(events: list[Any]) -> None:
        published.extend(e.doc for e in events)

    while await store.take_events(64, publish):
        pass
    failed = [e for e in published if '"failed"' in e]
    assert len(failed) == 2
    assert not any("nurlanovna" in e or "1234567" in e for e in published), failed


async def test_a_segment_requests_reason_is_stored_with_addresses_and_numbers_masked(store: Store) -> None:
    """A segment request's reason is often the partner's own words; the status API and the console
    show it, so it is stored masked as a delivery's is."""
    row = {
        "id": "seg1", "advisory_id": "a", "version": 1, "channel": "push", "segment": "geo:XA",
        "language": "en", "is_default": True, "languages": "en",
    }  # fmt: skip
    await store.plan_segments([row, {**row, "id": "seg2", "language": "kk"}])
    await store.segment_retry("seg1", "429 from relay: quota of ops@example.org reached, call +77011234567")
    await store.segment_ended("seg2", Status.FAILED, "400: segment owner aigerim@example.kz unknown")
    reasons = {seg.id: seg.reason for seg in await store.segments("a")}
    assert reasons == {
        "seg1": "429 from relay: quota of o***@example.org reached, call +770*****567",
        "seg2": "400: segment owner a***@example.kz unknown",
    }


async def test_a_receipt_reports_how_long_after_its_send_the_message_reached_the_person(store: Store) -> None:
    """The delivery latency (gateway_delivery_latency_seconds): the seconds from a delivery's send
    to its first receipt that says it reached the person; a later ``read`` is not a second one."""
    d1, d2 = await _made(store, ["r1", "r2"])
    await store.record([Outcome(d, Status.SENT, partner_id=f"p-{d}") for d in (d1, d2)], attempted=True)
    async with store.engine.begin() as conn:  # sent 90 s and 3 s ago
        for d, ago in ((d1, 90), (d2, 3)):
            await conn.execute(
                sa.update(deliveries)
                .where(deliveries.c.id == d)
                .values(sent_at=now() - timedelta(seconds=ago))
            )
    applied = await store.apply_receipts("smpp", [Outcome(d1, Status.DELIVERED), Outcome(d2, Status.READ)])
    assert sorted(round(s) for s in applied.reached_after_s) == [3, 90]
    applied = await store.apply_receipts("smpp", [Outcome(d1, Status.READ)])
    assert ([o.delivery_id for o in applied.moved], applied.reached_after_s) == ([d1], [])


async def test_a_batch_larger_than_one_statement_moves_every_delivery_once(store: Store) -> None:
    """On SQLite a batch is written as statements of _SQLITE_ROWS rows (on PostgreSQL as one): each
    row moves once, and the counters (kept by triggers) agree with a recount."""
    n = 2 * _SQLITE_ROWS + 7
    await store.upsert_recipients(
        [Recipient(id=f"r{i:05d}", app_user=f"u{i}", country="XA") for i in range(n)]
    )
    planned = [Planned(f"r{i:05d}", "push", Status.QUEUED) for i in range(n)]
    ids = await store.insert_deliveries("a", 1, planned)
    assert ids == sorted(ids)  # numbered as made: every index of them grows at its end
    assert await store.insert_deliveries("a", 1, planned[:10]) == ids[:10]  # a replayed page: the same ids
    sent = [Outcome(d, Status.SENT, partner_id=f"m{i}") for i, d in enumerate(ids)]
    assert await store.record(sent, attempted=True) == n
    assert await store.record(sent, attempted=True) == 0  # the same answer again moves nothing
    applied = await store.apply_receipts("push", [Outcome(d, Status.DELIVERED) for d in ids])
    assert (len(applied.moved), applied.unchanged) == (n, 0)
    assert (await store.delivery(ids[-1]) or {}).get("partner_id") == f"m{n - 1}"
    assert await store.recount() == await store.progress()
    assert {c.status: c.n for c in await store.progress() if c.n} == {"delivered": n}


async def test_a_sqlite_store_without_a_file_is_refused() -> None:
    """The SQLite writer's connection must see the same database as the others: not ``:memory:``."""
    with pytest.raises(ValueError, match=r"store\.url: SQLite needs a database file"):
        await Store.open("sqlite+aiosqlite:///:memory:")


async def test_an_urgent_writer_takes_the_next_write_turn_ahead_of_bulk_ones_waiting(tmp_path: Path) -> None:
    """SQLite: writers take turns in this process; an urgent advisory's writes go before bulk
    writes that were waiting longer, and a writer cancelled while waiting holds nobody up."""
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'turns.db'}")
    order: list[str] = []
    entered, release = asyncio.Event(), asyncio.Event()

    async def write(name: str, priority: int, hold: asyncio.Event | None = None) -> None:
        with working_for(priority):
            async with store.begin_write():
                order.append(name)
                if hold is not None:
                    entered.set()
                    await hold.wait()

    try:
        holder = asyncio.create_task(write("holder", BULK, release))
        await entered.wait()  # the holder has the turn
        bulk = [asyncio.create_task(write(f"bulk-{i}", BULK)) for i in range(3)]
        gone = asyncio.create_task(write("cancelled", URGENT))
        urgent = asyncio.create_task(write("urgent", URGENT))
        for _ in range(3):
            await asyncio.sleep(0)  # every writer is waiting for its turn now
        gone.cancel()
        release.set()
        await asyncio.gather(holder, urgent, *bulk)
    finally:
        await store.close()
    assert order == ["holder", "urgent", "bulk-0", "bulk-1", "bulk-2"]


async def test_receipts_are_written_after_urgent_work_and_before_bulk_work_waiting_longer(
    tmp_path: Path,
) -> None:
    """SQLite: a partner's receipt call waits for urgent writes only; bulk writes that were waiting
    longer come after it (a partner posting its receipts one call at a time waited a whole round of
    bulk writes for every call)."""
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'turns.db'}")
    d1 = await _one_sent(store)
    seen: list[tuple[str, str]] = []  # (writer, the delivery's status when its turn came)
    entered, release = asyncio.Event(), asyncio.Event()

    async def write(name: str, priority: int, hold: asyncio.Event | None = None) -> None:
        with working_for(priority):
            async with store.begin_write():
                seen.append((name, str((await store.delivery(d1) or {}).get("status"))))
                if hold is not None:
                    entered.set()
                    await hold.wait()

    try:
        holder = asyncio.create_task(write("holder", BULK, release))
        await entered.wait()  # the holder has the turn
        bulk = asyncio.create_task(write("bulk", BULK))
        await asyncio.sleep(0)
        receipts = asyncio.create_task(store.apply_receipts("smpp", [Outcome(d1, Status.DELIVERED)]))
        await asyncio.sleep(0)
        urgent = asyncio.create_task(write("urgent", URGENT))
        for _ in range(3):
            await asyncio.sleep(0)  # every writer is waiting for its turn now
        release.set()
        await asyncio.gather(holder, bulk, receipts, urgent)
    finally:
        await store.close()
    assert seen == [("holder", "sent"), ("urgent", "sent"), ("bulk", "delivered")]


async def test_recipients_read_back_as_stored_in_the_order_asked(store: Store) -> None:
    """Pages of an audience come back whole and in id order (on SQLite they are read as one row of
    JSON: nothing may be lost or reordered on the way)."""
    people = [
        Recipient(
            id=f"r{i:03d}", languages=("kk", "ru"), phone=f"+7701123{i:04d}", email=f"p{i}@example.org",
            app_user=f"u{i}", country="XA", region="north" if i % 2 else None,
            tags=("staff",) if i % 3 else (), opt_outs=("sms",) if i % 5 == 0 else (),
        )
        for i in range(250, 0, -1)
    ]  # fmt: skip
    await store.upsert_recipients(people)
    by_id = sorted(people, key=lambda r: r.id)
    first = await store.audience_page(["XA"], [], [], after="", limit=100)
    rest = await store.audience_page(["XA"], [], [], after=first[-1].id, limit=1000)
    assert [c.recipient() for c in first + rest] == by_id
    found = await store.recipients_by_id(["r007", "r100", "nobody"])
    assert sorted((c.recipient() for c in found), key=lambda r: r.id) == [by_id[6], by_id[99]]


async def test_a_phone_is_checked_when_stored_and_planning_reads_that_check(store: Store) -> None:
    """Planning reads the verdict the directory stored with the number instead of parsing it again
    (a million numbers); a row stored before that verdict existed is checked when it is read."""
    await store.upsert_recipients(
        [
            Recipient(id="ok", phone="+77011234567", country="XA"),
            Recipient(id="typo", phone="12345", country="XA"),
            Recipient(id="app", app_user="u1", country="XA"),
        ]
    )
    async with store.engine.begin() as conn:  # as migration 0012 leaves a row stored before it
        await conn.execute(sa.update(recipients).where(recipients.c.id == "typo").values(phone_valid=None))
    await store.upsert_recipients([Recipient(id="old", phone="+77011234568", country="XA")])
    async with store.engine.begin() as conn:
        await conn.execute(sa.update(recipients).where(recipients.c.id == "old").values(phone_valid=None))
    await store.upsert_recipients([Recipient(id="bad", phone="+7 701 12", country="XA")])
    page = await store.audience_page(["XA"], [], [], after="", limit=10)
    with patch("gateway.models.phonenumbers.parse", wraps=phonenumbers.parse) as parsed:
        problems = {c.id: c.phone_problem for c in page}
    assert problems == {"app": None, "bad": INVALID_PHONE, "ok": None, "old": None, "typo": INVALID_PHONE}
    assert sorted(call.args[0] for call in parsed.call_args_list) == ["+77011234568", "12345"]


async def test_a_write_taken_back_before_its_turn_never_runs_and_one_under_way_ends_first(
    tmp_path: Path,
) -> None:
    """SQLite's writer: a transaction whose caller is cancelled while it waits is never run; one
    cancelled while it runs commits (or rolls back) whole before the cancel reaches the caller."""
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'writer.db'}")
    entered, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def holder() -> None:
        async with store.begin_write():
            entered.set()
            await release.wait()

    def insert(name: str) -> Callable[[sqlite3.Connection], None]:
        def work(db: sqlite3.Connection) -> None:
            ran.append(name)
            db.execute(
                "INSERT INTO withdrawals (advisory_id, state, by_id, at) VALUES (?, 'cancelled', 'x', '')",
                [name],
            )

        return work

    try:
        held = asyncio.create_task(holder())
        await entered.wait()
        waiting = asyncio.create_task(store._write(insert("never")))
        kept = asyncio.create_task(store._write(insert("kept")))
        await asyncio.sleep(0)  # both are queued behind the holder
        waiting.cancel()
        release.set()
        await asyncio.gather(held, kept)
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert ran == ["kept"]

        started, go_on = threading.Event(), threading.Event()

        def slow(db: sqlite3.Connection) -> None:
            started.set()
            go_on.wait(10)
            insert("slow")(db)

        under_way = asyncio.create_task(store._write(slow))
        await asyncio.to_thread(started.wait, 10)
        under_way.cancel()
        for _ in range(5):
            await asyncio.sleep(0)  # the cancel is taken in: the caller waits for the transaction
        assert not under_way.done()
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await under_way
        async with store.engine.connect() as conn:
            stored = (await conn.execute(sa.text("SELECT advisory_id FROM withdrawals"))).scalars().all()
        assert sorted(stored) == ["kept", "slow"]
    finally:
        await store.close()
