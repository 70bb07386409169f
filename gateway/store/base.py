"""The store's engine and its ways to write and read: on SQLite through the writer's and the readers'
threads (gateway/store/sqlite.py), on PostgreSQL through asyncpg."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway import migrate as migrations
from gateway.migrate import Mode
from gateway.models import Advisory
from gateway.store.sqlite import SQLITE_PRAGMAS, T, _sqlite_text, _SqliteReaders, _SqliteWriter


def among(column: sa.ColumnElement[Any], values: Sequence[Any], dialect: str) -> sa.ColumnElement[bool]:
    """``column IN values``; on PostgreSQL ``= ANY`` one array parameter. An IN list of a batch's
    500 ids was compiled by SQLAlchemy for every batch, and prepared again by asyncpg for every
    length of list: a tenth of the event loop in a broadcast on PostgreSQL."""
    if dialect == "postgresql":
        return column == sa.any_(sa.literal(list(values), postgresql.ARRAY(column.type)))
    return column.in_(list(values))


class StoreBase:
    """The engine, and how the store's parts write and read through it (one class a table's
    queries: gateway/store/__init__.py puts them together)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        # SQLite has one writer at a time: in one process, writers take turns at _SqliteWriter (its
        # hot transactions run on its own connection, the others on the engine's in its turn).
        # PostgreSQL needs no such thing.
        self._writer: _SqliteWriter | None = None
        self._readers: _SqliteReaders | None = None
        if self._dialect == "sqlite":
            path = engine.url.database
            if not path or path == ":memory:":
                raise ValueError("store.url: SQLite needs a database file (every connection shares it)")
            self._writer = _SqliteWriter(path)
            self._readers = _SqliteReaders(path)
        # PostgreSQL: deliveries inserted since this process last had the table analyzed (see _grown)
        self._inserted = 0
        self._analyzed_at = 0
        self._parsed: dict[tuple[str, int], Advisory] = {}

    @contextlib.asynccontextmanager
    async def begin_write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction for the modules that keep their own queries (auth, audit)."""
        async with self._begin() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (on SQLite, one at a time in this process: in the writer's turn)."""
        if self._writer is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._writer.hold(), self.engine.begin() as conn:
            yield conn

    @classmethod
    async def open(cls, url: str, migrate: Mode = "upgrade") -> Self:
        """Connect, and bring the schema to this release's (or refuse: gateway/migrate.py)."""
        if url.startswith("sqlite"):
            engine = create_async_engine(url, connect_args={"timeout": 30})

            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(dbapi_conn: Any, _: Any) -> None:
                cur = dbapi_conn.cursor()
                for pragma in SQLITE_PRAGMAS:
                    cur.execute(f"PRAGMA {pragma}")
                cur.close()

        else:
            engine = create_async_engine(url, pool_size=10)
        try:
            await migrations.ensure(engine, migrate)
            return cls(engine)
        except BaseException:
            await engine.dispose()
            raise

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
        if self._readers is not None:
            await self._readers.close()
        await self.engine.dispose()

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` as one SQLite transaction in the writer's thread, in its turn."""
        assert self._writer is not None
        return await self._writer.run(work)

    async def _transact(self, work: Callable[[sa.Connection], T]) -> T:
        """``work`` (Core statements on a synchronous connection) as one write transaction. On
        SQLite whole in the writer's thread, in this process's write turn: one hand-over from the
        event loop, where through aiosqlite each statement was one (an advisory's ``accept``, a
        dozen statements, held the write lock ~110 ms under load). Elsewhere through the async
        driver (``run_sync``)."""
        if self._writer is not None:
            return await self._writer.run_core(work)
        async with self.engine.begin() as conn:
            return await conn.run_sync(work)

    async def _read(self, work: Callable[[sa.Connection], T]) -> T:
        """``work`` (Core statements on a synchronous connection) on a reading connection: on SQLite
        whole in a reader's thread (one hand-over), elsewhere through the async driver."""
        if self._readers is not None:
            return await self._readers.run(work)
        async with self.engine.connect() as conn:
            return await conn.run_sync(work)

    async def ping(self) -> None:
        """One round trip to the database (readiness)."""
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    async def _execute(self, statement: sa.Update | sa.Delete | sa.Insert) -> int:
        """One write statement as its own transaction; returns the rows it changed. On SQLite in the
        writer's thread, one hand-over instead of a trip through aiosqlite for BEGIN, the statement
        and COMMIT each (a planning cursor saved so held the write lock 74 ms under load)."""
        if self._writer is None:
            async with self._begin() as conn:
                return (await conn.execute(statement)).rowcount
        text, params = _sqlite_text(statement)
        return await self._write(lambda db: db.execute(text, params).rowcount)
