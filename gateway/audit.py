"""The audit log: who did what, when — append-only.

Every entry is one row of ``audit`` (actor, action, subject, detail). There is no update or delete
path in the code: ``append`` inserts, ``read`` selects. Entries are written in the same transaction
as the change they record (an advisory stored in its state, a token created or revoked), so the log
never says something happened that did not, nor misses what did.

Actions: ``advisory.<state>`` (stored in that state, or moved to it by a withdrawal),
``token.created``, ``token.revoked``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.models import now
from gateway.schema import audit


async def append(
    conn: AsyncConnection, actor: str, action: str, subject: str, detail: Mapping[str, Any] | None = None
) -> None:
    """One entry, inside the caller's transaction."""
    row = {"at": now(), "actor": actor, "action": action, "subject": subject, "detail": dict(detail or {})}
    await conn.execute(sa.insert(audit).values(**row))


async def read(engine: AsyncEngine, subject: str | None = None, limit: int = 1000) -> Sequence[sa.RowMapping]:
    """Entries in the order they were written (for one subject, if given)."""
    q = sa.select(audit).order_by(audit.c.seq).limit(limit)
    if subject is not None:
        q = q.where(audit.c.subject == subject)
    async with engine.connect() as conn:
        return (await conn.execute(q)).mappings().all()
