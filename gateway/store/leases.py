"""Planning leases: one instance plans an advisory version at a time (advisories.planner and
plan_lease_until)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from gateway.schema import advisories


def _lease_free(planner: Any, at: Any) -> sa.ColumnElement[bool]:
    """``planner`` may plan the advisory version at ``at``: nobody holds the lease, ``planner`` does,
    or the holder's has run out."""
    t = advisories.c
    return sa.or_(t.planner.is_(None), t.planner == planner, t.plan_lease_until < at)


def _claimed(advisory_id: Any, version: Any, after: Any, planner: Any, at: Any, until: Any) -> sa.Update:
    """Take or renew the lease to plan an advisory version, if its cursor is still ``after``."""
    t = advisories.c
    return (
        sa.update(advisories)
        .where(t.id == advisory_id, t.version == version, t.plan_cursor == after, _lease_free(planner, at))
        .values(planner=planner, plan_lease_until=until)
    )


# _claimed for SQLite's writer, as text once, with named parameters
_SQLITE_CLAIM = str(
    _claimed(
        *(sa.literal_column(f":{n}") for n in ("id", "version", "after", "planner", "at", "until"))
    ).compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
)
