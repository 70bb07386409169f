"""``broadcast-gateway report ID --csv``: one line per delivery of an advisory — who (recipient id
and address), which version and channel, what became of it and why — streamed from the store a page
at a time and written as it comes, so a million rows cost the memory of one page.

Addresses are masked (``+770*****567``, ``a***@example.kz``, ``app-***``) unless ``--unmasked`` is
given; an unmasked report is an audit entry (``report.unmasked``) with who asked.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from typing import IO, Any

import sqlalchemy as sa

from gateway import audit
from gateway.logging import mask_email, mask_phone
from gateway.models import channel_kind
from gateway.schema import deliveries, recipients
from gateway.store import Store

COLUMNS = (
    "delivery_id",
    "version",
    "channel",
    "status",
    "reason",
    "attempts",
    "sent_at",
    "updated_at",
    "recipient_id",
    "address",
)
PAGE = 2000


def masked(kind: str, address: str | None) -> str:
    """An address as a report shows it by default: enough to tell people apart, not to reach them."""
    if not address:
        return ""
    if kind == "sms":
        return mask_phone(address)
    if kind == "email":
        return mask_email(address)
    return address[:4] + "***" if len(address) > 4 else "***"


async def rows(store: Store, advisory_id: str, unmasked: bool) -> AsyncIterator[list[Any]]:
    """Every delivery of the advisory (all versions), in delivery id order, streamed."""
    q = (
        sa.select(
            deliveries.c.id,
            deliveries.c.version,
            deliveries.c.channel,
            deliveries.c.status,
            deliveries.c.reason,
            deliveries.c.attempts,
            deliveries.c.sent_at,
            deliveries.c.updated_at,
            deliveries.c.recipient_id,
            recipients.c.phone,
            recipients.c.email,
            recipients.c.app_user,
        )
        .select_from(deliveries.outerjoin(recipients, recipients.c.id == deliveries.c.recipient_id))
        .where(deliveries.c.advisory_id == advisory_id)
        .order_by(deliveries.c.id)
        .execution_options(yield_per=PAGE)
    )
    async with store.engine.connect() as conn:
        result = await conn.stream(q)
        async for r in result:
            kind = channel_kind(r.channel)
            address = {"sms": r.phone, "email": r.email, "push": r.app_user}.get(kind)
            yield [
                r.id,
                r.version,
                r.channel,
                r.status,
                r.reason or "",
                r.attempts,
                r.sent_at.isoformat() if r.sent_at else "",
                r.updated_at.isoformat() if r.updated_at else "",
                r.recipient_id,
                (address or "") if unmasked else masked(kind, address),
            ]


async def write_csv(store: Store, advisory_id: str, out: IO[str], unmasked: bool, actor: str) -> int:
    """Write the report to ``out`` (off the event loop, a page at a time); returns the rows written."""
    if unmasked:
        async with store.begin_write() as conn:
            await conn.run_sync(audit.append, actor, "report.unmasked", advisory_id)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    n = 0
    async for row in rows(store, advisory_id, unmasked):
        writer.writerow(row)
        n += 1
        if n % PAGE == 0:
            await asyncio.to_thread(out.write, buffer.getvalue())
            buffer.seek(0)
            buffer.truncate()
    await asyncio.to_thread(out.write, buffer.getvalue())
    await asyncio.to_thread(out.flush)
    return n
