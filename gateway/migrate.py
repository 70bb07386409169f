"""Schema migrations (Alembic, ``gateway/migrations``): one history for SQLite and PostgreSQL.

At start-up the store brings the database to this release's schema, or refuses (``store.migrate``):

- an empty database gets the whole history;
- a database made before migrations existed (release 0.1.0: tables, no ``alembic_version``) is
  stamped with revision 0001 — its schema — and upgraded from there;
- an older revision is upgraded (``migrate: upgrade``, the default) or start-up stops with a message
  naming ``broadcast-gateway db upgrade`` (``migrate: refuse``, for several instances sharing one
  database, where one operator step should change the schema);
- a revision this release does not know (a newer release wrote it) always stops start-up.
"""

from __future__ import annotations

from typing import Literal

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import ConfigError
from gateway.logging import get_logger

log = get_logger(__name__)

PRE_MIGRATIONS = "0001"  # the schema of release 0.1.0, made without migrations
Mode = Literal["upgrade", "refuse"]


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "gateway:migrations")
    return cfg


def head() -> str:
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None  # the history is never empty
    return revision


def _current(sync_conn: sa.Connection) -> str | None:
    """The database's revision; PRE_MIGRATIONS for a release-0.1.0 database; None if empty."""
    revision = MigrationContext.configure(sync_conn).get_current_revision()
    if revision is None and sa.inspect(sync_conn).has_table("advisories"):
        return PRE_MIGRATIONS
    return revision


def _run(sync_conn: sa.Connection, verb: Literal["upgrade", "stamp"], revision: str) -> None:
    cfg = _config()
    cfg.attributes["connection"] = sync_conn
    getattr(command, verb)(cfg, revision)


async def current(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def upgrade(engine: AsyncEngine) -> tuple[str | None, str]:
    """Bring the database to this release's schema; returns (revision before, revision after)."""
    async with engine.begin() as conn:
        before = await conn.run_sync(_current)
        if before == PRE_MIGRATIONS and await conn.run_sync(
            lambda c: MigrationContext.configure(c).get_current_revision() is None
        ):
            await conn.run_sync(_run, "stamp", PRE_MIGRATIONS)
        await conn.run_sync(_run, "upgrade", "heads")
    after = head()
    if before is not None and before != after:
        log.info("store.migrated", before=before or "(empty)", after=after)
    return before, after


async def ensure(engine: AsyncEngine, mode: Mode) -> None:
    """Upgrade the database, or refuse to start on an old schema (see the module docstring)."""
    revision, latest = await current(engine), head()
    if revision == latest:
        return
    known = {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}
    if revision is not None and revision not in known:
        raise ConfigError(
            f"store.url: the database is at schema revision {revision!r}, which this release does not "
            f"know (it needs {latest!r}); a newer release wrote it"
        )
    if revision is not None and mode == "refuse":
        raise ConfigError(
            f"store.url: the database schema is at revision {revision!r}; this release needs {latest!r}. "
            "Run `broadcast-gateway db upgrade` (or set store.migrate: upgrade)"
        )
    await upgrade(engine)
