"""SQLite's plumbing: the connections' settings, the writer and reader threads of the store's own, their
turns (``working_for``), and statements built for the driver a batch at a time."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from datetime import datetime
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql.compiler import SQLCompiler

from gateway.models import BULK, URGENT

# SQLite's hot statements go to the driver as written, a batch in one statement (its rows as one
# multi-row VALUES), with the time formatted once. A statement per row (executemany) gives up Python's
# GIL and takes it back for every row, and with the event loop busy in the other thread each taking
# back waited: one batch of 500 took up to 70 times as long as on an idle process.
_SQLITE_ROWS = 1000  # rows in one statement at most


def _marks(n: int) -> str:
    return ", ".join("?" * n)


@functools.lru_cache(maxsize=64)
def _sqlite_values(head: str, width: int, n: int, tail: str = "") -> str:
    """``head`` VALUES (?, …) × ``n`` ``tail``."""
    row = f"({_marks(width)})"
    return f"{head} VALUES {', '.join([row] * n)}{tail}"


def _sqlite_insert(
    db: sqlite3.Connection, statement: tuple[str, str], rows: Sequence[tuple[Any, ...]]
) -> int:
    """``rows`` by ``statement`` (the INSERT before and after its VALUES), ``_SQLITE_ROWS`` at a time;
    returns how many were inserted."""
    head, tail = statement
    inserted = 0
    for start in range(0, len(rows), _SQLITE_ROWS):
        part = rows[start : start + _SQLITE_ROWS]
        done = db.execute(
            _sqlite_values(head, len(part[0]), len(part), tail), [v for row in part for v in row]
        )
        inserted += done.rowcount
    return inserted


# every SQLite connection's settings (Store.open)
SQLITE_PRAGMAS = (
    "journal_mode=WAL",
    "synchronous=NORMAL",
    "busy_timeout=30000",
    # 16 MiB of pages per connection (the default is 2 MiB): the hot indexes of a broadcast's
    # deliveries stay in memory instead of being read again from the OS
    "cache_size=-16384",
    # checkpoint the WAL into the database every 20,000 pages (80 MB) instead of 1,000: a broadcast
    # rewrites the same index pages transaction after transaction, and each checkpoint copied them
    # again (18 % of the store's time at 100,000 deliveries); after a checkpoint the WAL file is cut
    # back to 64 MB
    "wal_autocheckpoint=20000",
    "journal_size_limit=67108864",
    "temp_store=MEMORY",
)
# the writer's own connection never checkpoints at its commits: a checkpoint of 20,000 pages made
# that COMMIT take 300-400 ms under load, the write turn held all the while (an urgent advisory's
# `accept` waited 400 ms behind one). A thread of its own checkpoints instead (PASSIVE: it takes no
# write lock), at most every CHECKPOINT_EVERY_S while the writer writes.
_WRITER_PRAGMAS = (*SQLITE_PRAGMAS, "wal_autocheckpoint=0")
CHECKPOINT_EVERY_S = 1.0


def _sqlite_time(at: datetime) -> str:
    """``at`` (UTC) as SQLAlchemy stores a DateTime in SQLite."""
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


def _lists(conn: sa.Connection, q: sa.Select[Any]) -> list[list[Any]]:
    """The rows of ``q``, each a list in the query's column order. On SQLite as one row, a JSON array
    of them: its driver runs in a thread of its own and takes Python's lock back for every row it
    steps to, and each time waits for the event loop to give it up (up to
    ``sys.getswitchinterval()``, 5 ms): 500 rows read while the loop was busy took 1.9 s instead of
    3 ms (docs/performance.md, fourth pass). Times come back as SQLite holds them (text), booleans as
    0/1; the order is the query's."""
    if conn.dialect.name != "sqlite":
        return [list(r) for r in conn.execute(q).all()]
    sub = q.subquery()
    (doc,) = (conn.execute(sa.select(sa.func.json_group_array(sa.func.json_array(*sub.c))))).one()
    rows: list[list[Any]] = orjson.loads(doc)
    return rows


def _sqlite_text(statement: sa.ClauseElement) -> tuple[str, list[Any]]:
    """A statement as SQLite text and its parameters, for the writer's connection (times as
    SQLAlchemy stores them in SQLite)."""
    compiled = statement.compile(dialect=sqlite.dialect())
    assert isinstance(compiled, SQLCompiler)
    params = compiled.construct_params() or {}
    values = (params[name] for name in compiled.positiontup or ())
    return str(compiled), [_sqlite_time(v) if isinstance(v, datetime) else v for v in values]


def _sqlite_all(db: sqlite3.Connection, columns: str, rest: str, params: Sequence[Any]) -> list[list[Any]]:
    """``SELECT columns rest`` on the writer's connection, as one row of JSON (see ``_lists``)."""
    q = f"SELECT json_group_array(json_array({columns})) {rest}"
    (doc,) = db.execute(q, params).fetchone()
    rows: list[list[Any]] = orjson.loads(doc)
    return rows


# the priority of the work the current task does (Advisory.priority): see working_for()
_WORKING_FOR: ContextVar[float] = ContextVar("working_for", default=BULK)
# receipts' write turns come after urgent work's and before bulk work's: a delivery's receipt finishes
# work already sent, and a partner that posts its receipts one call at a time waited a whole round of
# bulk writes for each call (a million deliveries: all delivered 37 s after all sent)
_RECEIPTS = (URGENT + BULK) / 2


@contextlib.contextmanager
def working_for(priority: float) -> Iterator[None]:
    """The store's writes and reads made inside are for work of ``priority``: on SQLite an urgent
    advisory's take the next turn of the writer (or a reader), ahead of bulk ones that were waiting."""
    token = _WORKING_FOR.set(priority)
    try:
        yield
    finally:
        _WORKING_FOR.reset(token)


T = TypeVar("T")


def _sqlite_connect(path: str, pragmas: Sequence[str]) -> sqlite3.Connection:
    """A stdlib connection for a thread of the store's own (the writer, a reader, the checkpointer)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    for pragma in pragmas:
        db.execute(f"PRAGMA {pragma}")
    return db


class _Held:
    """The writer's connection as SQLAlchemy sees it (``_SqliteWriter.run_core``): the transaction is
    the writer's own (BEGIN IMMEDIATE … COMMIT or ROLLBACK), so SQLAlchemy's commit, rollback and
    close leave it alone."""

    def __init__(self, db: sqlite3.Connection | None) -> None:
        object.__setattr__(self, "_db", db)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._db, name, value)

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Job:
    """One turn of a store thread: ``work`` to run on its connection — or, for the writer, a hold
    (``work`` None): the turn handed to a transaction of the engine's, the writer waiting until it is
    released."""

    def __init__(self, work: Callable[[Any], Any] | None, loop: asyncio.AbstractEventLoop) -> None:
        self.work = work
        self.loop = loop
        self.done: asyncio.Future[Any] = loop.create_future()
        self.state = "waiting"  # → started | dropped (its awaiter went before its turn came)
        self.released = threading.Event()  # a hold's end

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """(In the store's thread.) The outcome, to the event loop."""
        self.loop.call_soon_threadsafe(_settle, self.done, result, error)

    def complete(self, run: Callable[[Callable[[Any], Any]], Any]) -> None:
        """(In the store's thread.) ``run(work)``, its result or its error to the event loop (the
        caller's to handle)."""
        assert self.work is not None
        try:
            result = run(self.work)
        except BaseException as e:
            self.settle(error=e)
        else:
            self.settle(result)


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not done.done():
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)


class _Turns:
    """Jobs for a few threads of the store's own, taken in turn: urgent work's first (``working_for``),
    then receipts, then the rest in order of arrival. A thread goes on to the next job as soon as one
    ends, without waiting for the event loop to take the result (turns handed over by a busy loop
    had left SQLite's writer idle 3 ms between transactions: 30 % of its time at 200,000 deliveries).
    Cancelled before its turn, a job never runs; cancelled while it runs, it ends first."""

    def __init__(self, name: str, threads: int, serve: Callable[[_Job], None]) -> None:
        self._name = name
        self._size = threads
        self._serve_one = serve
        self._jobs: list[tuple[float, int, _Job]] = []
        self._arrivals = itertools.count()
        self._lock = threading.Condition()
        self._closing = False
        self._threads: list[threading.Thread] = []

    def submit(self, work: Callable[[Any], Any] | None) -> _Job:
        job = _Job(work, asyncio.get_running_loop())
        with self._lock:
            if not self._threads:
                self._threads = [
                    threading.Thread(target=self._serve, name=f"{self._name}-{i}", daemon=True)
                    for i in range(self._size)
                ]
                for thread in self._threads:
                    thread.start()
            heapq.heappush(self._jobs, (_WORKING_FOR.get(), next(self._arrivals), job))
            self._lock.notify()
        return job

    def drop(self, job: _Job) -> bool:
        """Take a job back that has not started: True if it will not run."""
        with self._lock:
            if job.state == "waiting":
                job.state = "dropped"
                return True
            return False

    async def run(self, work: Callable[[Any], T]) -> T:
        """``work`` in its turn; its result."""
        job = self.submit(work)
        try:
            result: T = await asyncio.shield(job.done)
            return result
        except asyncio.CancelledError:
            if not self.drop(job):  # under way: it ends in its thread first
                await asyncio.wait([job.done])
            raise

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closing:
                    self._lock.wait()
                if not self._jobs:
                    return
                _, _, job = heapq.heappop(self._jobs)
                if job.state == "dropped":
                    continue
                job.state = "started"
            self._serve_one(job)

    async def close(self) -> None:
        """Every job already submitted runs; then the threads end."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            threads = list(self._threads)
        for thread in threads:
            await asyncio.to_thread(thread.join)


class _SqliteWriter:
    """SQLite's one writer in this process: a thread of its own and its own connection, taking every
    write transaction in turn (``_Turns``) and running each whole: BEGIN, the statements, COMMIT in
    one hand-over from the event loop. Through SQLAlchemy each statement was a hand-over of its own,
    and between them the transaction — SQLite's only write lock — waited for a busy event loop to
    come round. A transaction of the engine's (``_begin``) takes a turn too (``hold``): the writer
    waits while it runs, so two connections never write at once. (Writers that collide in SQLite
    itself sleep in its busy handler, 1 ms to 100 ms; and in plain arrival order an urgent advisory's
    writes each waited behind every bulk batch.)"""

    def __init__(self, path: str) -> None:
        self._path = path
        self._turns = _Turns("sqlite-writer", 1, self._serve_one)
        self._db: sqlite3.Connection | None = None
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._checkpoint_db: sqlite3.Connection | None = None
        self._checkpointing: Future[None] | None = None
        self._next_checkpoint = 0.0
        # SQLAlchemy over this same connection, for transactions kept as Core statements (run_core)
        self._core = sa.create_engine(
            "sqlite://", creator=lambda: _Held(self._db), poolclass=sa.pool.StaticPool
        )

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` as one transaction, in its turn. Cancelled while it runs: it ends first."""
        return await self._turns.run(work)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """The writer's turn, for a transaction on another connection (the engine's): the writer
        waits until the block ends."""
        job = self._turns.submit(None)
        try:
            await asyncio.shield(job.done)
        except asyncio.CancelledError:
            if not self._turns.drop(job):  # handed the turn meanwhile: give it back
                job.released.set()
            raise
        try:
            yield
        finally:
            job.released.set()

    def _serve_one(self, job: _Job) -> None:
        if job.work is None:  # a hold: the turn is the engine's until it is released
            job.settle()
            job.released.wait()
            return
        job.complete(self._transaction)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._db = _sqlite_connect(self._path, _WRITER_PRAGMAS)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self._checkpoint_soon()
        return result

    def _checkpoint_soon(self) -> None:
        """(In the writer's thread, after a commit.) Start a checkpoint in its own thread unless one
        runs or one started less than CHECKPOINT_EVERY_S ago."""
        at = time.monotonic()
        if at < self._next_checkpoint or (self._checkpointing is not None and not self._checkpointing.done()):
            return
        self._next_checkpoint = at + CHECKPOINT_EVERY_S
        self._checkpointing = self._checkpointer.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        if self._checkpoint_db is None:
            self._checkpoint_db = _sqlite_connect(self._path, SQLITE_PRAGMAS)
        self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def run_core(self, work: Callable[[sa.Connection], T]) -> T:
        """``work`` with a SQLAlchemy connection over this one, as one transaction in its thread."""

        def core(_: sqlite3.Connection) -> T:
            with self._core.connect() as conn:
                return work(conn)

        return await self.run(core)

    async def close(self) -> None:
        """Every turn already taken runs; then the connections close."""
        await self._turns.close()
        self._core.dispose()
        await asyncio.to_thread(self._checkpointer.shutdown)  # a checkpoint under way ends first
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
            self._checkpoint_db = None
        if self._db is not None:
            self._db.close()
            self._db = None


class _SqliteReaders:
    """SQLite's reads, each whole in one of a few threads of their own, each thread with its own
    connection and SQLAlchemy over it: one hand-over from the event loop per read, where through
    aiosqlite a read was several (the connection taken from the pool, the statement, its rows, the
    connection given back), each waiting for a busy loop to come round. Reads take turns as writes do
    (``_Turns``): an urgent advisory's reads go before the bulk reads waiting (a thread pool served
    them in order of arrival)."""

    def __init__(self, path: str, threads: int = 4) -> None:
        self._path = path
        self._turns = _Turns("sqlite-reader", threads, self._serve_one)
        self._local = threading.local()
        self._engines: list[sa.Engine] = []
        self._lock = threading.Lock()

    async def run(self, work: Callable[[sa.Connection], T]) -> T:
        return await self._turns.run(work)

    def _serve_one(self, job: _Job) -> None:
        job.complete(self._read)

    def _read(self, work: Callable[[sa.Connection], T]) -> T:
        engine: sa.Engine | None = getattr(self._local, "engine", None)
        if engine is None:
            db = _sqlite_connect(self._path, SQLITE_PRAGMAS)
            engine = self._local.engine = sa.create_engine(
                "sqlite://", creator=lambda: db, poolclass=sa.pool.StaticPool
            )
            with self._lock:
                self._engines.append(engine)
        with engine.connect() as conn:
            return work(conn)

    async def close(self) -> None:
        await self._turns.close()
        with self._lock:
            for engine in self._engines:
                engine.dispose()
            self._engines.clear()
