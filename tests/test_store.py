"""Store behaviour on SQLite: statuses only move forward; receipts without our id find their delivery."""

from __future__ import annotations

from pathlib import Path

from gateway.models import Recipient, Status
from gateway.store import Outcome, Store


async def _store_with_one_sent(tmp_path: Path) -> Store:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    await store.upsert_recipients([Recipient(id="r1", phone="+77011234567", country="XA")])
    row = {
        "id": "d1",
        "advisory_id": "a",
        "version": 1,
        "recipient_id": "r1",
        "channel": "smpp",
        "status": Status.PLANNED.value,
    }
    await store.insert_deliveries([row])
    await store.record([Outcome("d1", Status.SENT, partner_id="smsc-42")], attempted=True)
    return store


async def test_a_receipt_without_our_id_is_matched_by_the_partner_message_id(tmp_path: Path) -> None:
    store = await _store_with_one_sent(tmp_path)
    try:
        applied = await store.apply_receipts("smpp", [Outcome("", Status.DELIVERED, partner_id="smsc-42")])
        assert [o.delivery_id for o in applied.moved] == ["d1"]
        assert (await store.delivery("d1") or {}).get("status") == "delivered"
        applied = await store.apply_receipts("smpp", [Outcome("", Status.DELIVERED, partner_id="unknown")])
        assert (applied.moved, [o.partner_id for o in applied.unknown]) == ([], ["unknown"])
    finally:
        await store.close()


async def test_only_receipts_that_move_a_delivery_are_reported_as_moved(tmp_path: Path) -> None:
    """A duplicate or out-of-order receipt is stored but changes nothing: no event is due for it."""
    store = await _store_with_one_sent(tmp_path)
    try:
        batch = [Outcome("d1", Status.DELIVERED), Outcome("d1", Status.DELIVERED), Outcome("d1", Status.READ)]
        applied = await store.apply_receipts("smpp", batch)
        assert [o.status for o in applied.moved] == [Status.DELIVERED, Status.READ]
        assert applied.unchanged == 1
        late = await store.apply_receipts(
            "smpp", [Outcome("d1", Status.DELIVERED), Outcome("zz", Status.READ)]
        )
        assert (late.moved, late.unchanged, [o.delivery_id for o in late.unknown]) == ([], 1, ["zz"])
        assert (await store.delivery("d1") or {}).get("status") == "read"
    finally:
        await store.close()


async def test_a_late_write_never_moves_a_delivery_backwards(tmp_path: Path) -> None:
    store = await _store_with_one_sent(tmp_path)
    try:
        await store.apply_receipts("smpp", [Outcome("d1", Status.READ)])
        assert await store.record([Outcome("d1", Status.SENT)]) == 0
        assert await store.record([Outcome("d1", Status.DELIVERED)]) == 0
        assert (await store.delivery("d1") or {}).get("status") == "read"
    finally:
        await store.close()
