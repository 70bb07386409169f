"""Schema migrations: a database made by release 0.1.0 (before migrations) upgrades with its people,
withdrawals and deliveries intact; the history builds exactly the schema the code declares, on SQLite
and PostgreSQL; an old schema can be refused with the command that upgrades it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from gateway import migrate
from gateway.errors import ConfigError
from gateway.lifecycle import AdvisoryState
from gateway.models import Advisory, Recipient, Status
from gateway.store import Event, Outcome, Planned, Store, metadata
from tests.conftest import advisory, fresh_postgres_database

RELEASE_0_1_0 = Path(__file__).parent / "fixtures" / "gateway-0.1.0.db"


def _copy_of_release_db(tmp_path: Path) -> str:
    path = tmp_path / "old.db"
    shutil.copy(RELEASE_0_1_0, path)
    return f"sqlite+aiosqlite:///{path}"


def _differences(sync_conn: sa.Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(sync_conn), metadata))


async def test_a_release_0_1_0_database_upgrades_with_everything_in_it(tmp_path: Path) -> None:
    store = await Store.open(_copy_of_release_db(tmp_path))
    try:
        assert await migrate.current(store.engine) == migrate.head()
        assert await store.count_recipients() == 20
        assert await store.counts("old-evac-1") == {"push": {"delivered": 5, "sent": 5, "queued": 10}}
        assert await store.advisory_state("old-evac-1", 1) is AdvisoryState.ACTIVE
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
        # the cancel remembered by the old release still keeps its alert from being sent
        late = Advisory.model_validate(advisory(id="old-evac-0"))
        assert (await store.accept(late, late.model_dump(mode="json"), {})).state is AdvisoryState.CANCELLED
    finally:
        await store.close()


async def test_refuse_mode_names_the_command_and_db_upgrade_does_it(tmp_path: Path) -> None:
    url = _copy_of_release_db(tmp_path)
    with pytest.raises(ConfigError, match=r"revision '0001'.*Run `broadcast-gateway db upgrade`"):
        await Store.open(url, migrate="refuse")
    engine = create_async_engine(url)
    try:
        assert await migrate.current(engine) == "0001"  # refused: nothing was changed
    finally:
        await engine.dispose()


def test_db_upgrade_command_upgrades_an_old_file(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GATEWAY__STORE__URL": _copy_of_release_db(tmp_path),
        "GATEWAY__LOGGING__LEVEL": "error",
    }

    def db(action: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "db", action],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    assert db("upgrade") == f"schema upgraded: 0001 → {migrate.head()}"
    assert db("current") == f"schema at {migrate.head()}; this release needs {migrate.head()}"


async def test_a_schema_written_by_a_newer_release_stops_start_up(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'new.db'}"
    await (await Store.open(url)).close()  # created at this release's head
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    await engine.dispose()
    with pytest.raises(ConfigError, match=r"revision '9999', which this release does not know"):
        await Store.open(url)


async def test_the_history_builds_the_declared_schema_on_postgresql() -> None:
    async with fresh_postgres_database() as url:
        store = await Store.open(url)
        try:
            async with store.engine.connect() as conn:
                assert await conn.run_sync(_differences) == []
            assert await migrate.current(store.engine) == migrate.head()
        finally:
            await store.close()


async def test_event_and_receipt_numbers_go_past_two_to_the_31_on_postgresql() -> None:
    """A busy deployment makes billions of delivery events and receipts: their numbers (and
    sequences) are 64-bit, so the outbox and the receipts log never stop taking rows (migration
    0013)."""
    async with fresh_postgres_database() as url:
        store = await Store.open(url)
        try:
            await store.deliver_events(True)
            async with store.engine.begin() as conn:
                for table in ("delivery_events", "receipts", "delivery_count_deltas"):
                    await conn.execute(
                        sa.text(f"SELECT setval(pg_get_serial_sequence('{table}', 'seq'), {2**31})")
                    )
            await store.upsert_recipients([Recipient(id="r1", app_user="u1", country="XA")])
            [d1] = await store.insert_deliveries("a", 1, [Planned("r1", "push", Status.QUEUED)])
            await store.apply_receipts("push", [Outcome(d1, Status.DELIVERED)])
            async with store.engine.connect() as conn:
                events = (
                    (await conn.execute(sa.text("SELECT seq FROM delivery_events ORDER BY seq")))
                    .scalars()
                    .all()
                )
                receipts = (await conn.execute(sa.text("SELECT seq FROM receipts"))).scalars().all()
            assert events == [2**31 + 1, 2**31 + 2]
            assert receipts == [2**31 + 1]
            assert await store.counts("a") == {"push": {"delivered": 1}}  # the deltas past 2**31 folded in
        finally:
            await store.close()


async def test_a_store_with_events_waiting_keeps_them_through_the_upgrade_to_0013(tmp_path: Path) -> None:
    """SQLite's outbox is copied to number its rows AUTOINCREMENT: the events waiting stay, in order,
    and the events' triggers on the deliveries go on writing to it."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    store = await Store.open(url)
    await store.deliver_events(True)
    await store.upsert_recipients([Recipient(id=f"r{i}", app_user=f"u{i}", country="XA") for i in range(4)])
    await store.close()
    made_at_0012 = sa.text(
        "INSERT INTO deliveries (id, advisory_id, version, recipient_id, channel, status, rank, updated_at) "
        "VALUES (:id, 'a', 1, :r, 'push', 'queued', 1, '2026-01-01 00:00:00')"
    )
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(migrate._run, "downgrade", "0012")  # type: ignore[arg-type]
        async with engine.begin() as conn:  # deliveries made while the store was at 0012: 3 events
            for i in range(3):
                await conn.execute(made_at_0012, {"id": f"d{i}", "r": f"r{i}"})
    finally:
        await engine.dispose()
    store = await Store.open(url)  # upgrades to the head
    try:
        async with store.engine.connect() as conn:
            ddl = (
                await conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE name = 'delivery_events'"))
            ).scalar()
            waiting = (
                (await conn.execute(sa.text("SELECT delivery_id FROM delivery_events ORDER BY seq")))
                .scalars()
                .all()
            )
        assert "AUTOINCREMENT" in str(ddl)
        assert waiting == ["d0", "d1", "d2"]
        await store.insert_deliveries("a", 1, [Planned("r3", "push", Status.QUEUED)])
        taken: list[Event] = []

        async def publish(events: list[Event]) -> None:
            taken.extend(events)

        assert await store.take_events(100, publish) == 4
        assert [e.seq for e in taken] == sorted({e.seq for e in taken})
    finally:
        await store.close()
