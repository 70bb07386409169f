"""The audit log: who did what, when — append-only.

Every entry is one row of ``audit`` (actor, action, subject, detail). There is no update or delete
path in the code: ``append`` inserts, ``read`` selects. Entries are written in the same transaction
as the change they record (an advisory stored in its state, a token created or revoked), so the log
never says something happened that did not, nor misses what did.

Actions: ``advisory.submitted`` (a token submitted it through the API), ``advisory.<state>`` (stored
in that state, moved to it by a withdrawal, an approver's decision, an operator's cancel or the
approval timeout), ``token.created``, ``token.revoked``, ``record.dead_lettered`` (intake refused a
record: subject ``dlq:<topic>/<partition>/<offset>``, detail the kind of error and the reason — what
the console's dead-letter list reads, on every instance). The actor is the API token
(``token:<id>:<name>``), the sender (``sender:<name>``) or ``gateway`` (time-driven moves).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.models import now
from gateway.schema import audit


def append(
    conn: sa.Connection, actor: str, action: str, subject: str, detail: Mapping[str, Any] | None = None
) -> None:
    """One entry, inside the caller's transaction (from async code: ``await conn.run_sync(append, …)``)."""
    row = {"at": now(), "actor": actor, "action": action, "subject": subject, "detail": dict(detail or {})}
    conn.execute(sa.insert(audit).values(**row))


async def read(
    engine: AsyncEngine,
    subject: str | None = None,
    limit: int = 1000,
    subject_prefix: str | None = None,
    after: int = 0,
    newest_first: bool = False,
) -> Sequence[sa.RowMapping]:
    """Entries in the order they were written (for one subject, or subjects starting with a prefix,
    e.g. every version of an advisory: ``id@v``), from sequence number ``after`` on; or the
    ``limit`` newest, newest first."""
    order = audit.c.seq.desc() if newest_first else audit.c.seq
    q = sa.select(audit).where(audit.c.seq > after).order_by(order).limit(limit)
    if subject is not None:
        q = q.where(audit.c.subject == subject)
    if subject_prefix is not None:
        q = q.where(audit.c.subject.startswith(subject_prefix, autoescape=True))
    async with engine.connect() as conn:
        return (await conn.execute(q)).mappings().all()
