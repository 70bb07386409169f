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
from gateway.models import Advisory
from gateway.store import Store, metadata
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
