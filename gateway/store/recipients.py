"""Recipients: the directory, and an advisory's audience read a page at a time."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import partial
from typing import Any

import sqlalchemy as sa

from gateway.models import Contact, Recipient, now
from gateway.schema import recipients
from gateway.store.base import StoreBase
from gateway.store.sqlite import _lists


def _in_audience(
    q: sa.Select[Any], countries: Sequence[str], regions: Sequence[str], tags: Sequence[str]
) -> sa.Select[Any]:
    """``q`` restricted to the recipients an audience names (none, if it names none of these: an
    audience of partner segments only has no one in our directory)."""
    if not (countries or regions or tags):
        return q.where(sa.false())
    if countries:
        q = q.where(recipients.c.country.in_(list(countries)))
    if regions:
        q = q.where(recipients.c.region.in_(list(regions)))
    if tags:
        q = q.where(sa.or_(*(recipients.c.tags.contains(f",{t},", autoescape=True) for t in tags)))
    return q


def _recipient_row(r: Recipient, at: datetime) -> dict[str, Any]:
    return {
        "id": r.id,
        "languages": "|".join(r.languages),
        "phone": r.phone,
        "phone_valid": None if r.phone is None else r.phone_problem is None,
        "email": r.email,
        "app_user": r.app_user,
        "country": r.country,
        "region": r.region,
        "tags": "," + ",".join(r.tags) + "," if r.tags else "",
        "opt_outs": "|".join(r.opt_outs),
        "updated_at": at,
    }


# a recipient's columns in the order of Contact's fields
_CONTACT = (
    recipients.c.id,
    recipients.c.languages,
    recipients.c.phone,
    recipients.c.email,
    recipients.c.app_user,
    recipients.c.country,
    recipients.c.region,
    recipients.c.tags,
    recipients.c.opt_outs,
    recipients.c.phone_valid,
)


class RecipientsStore(StoreBase):
    """The directory: recipients upserted, and an audience read a page at a time."""

    # -- recipients ---------------------------------------------------------------------------

    async def upsert_recipients(self, batch: Sequence[Recipient]) -> None:
        if not batch:
            return
        at = now()
        stmt = self._insert(recipients)
        stmt = stmt.on_conflict_do_update(
            index_elements=[recipients.c.id],
            set_={c.name: stmt.excluded[c.name] for c in recipients.columns if c.name != "id"},
        )
        async with self._begin() as conn:
            await conn.execute(stmt, [_recipient_row(r, at) for r in batch])

    async def count_recipients(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(recipients))).scalar_one())

    async def audience_page(
        self, countries: Sequence[str], regions: Sequence[str], tags: Sequence[str], after: str, limit: int
    ) -> list[Contact]:
        """One page of the audience, in id order after ``after`` (keyset paging: nothing held open)."""
        page: sa.Select[Any] = sa.select(*_CONTACT).where(recipients.c.id > after)
        q = _in_audience(page.order_by(recipients.c.id).limit(limit), countries, regions, tags)
        return [Contact(*row) for row in await self._read(partial(_lists, q=q))]

    async def audience_size(
        self, countries: Sequence[str], regions: Sequence[str], tags: Sequence[str]
    ) -> int:
        """How many recipients an audience names (the approval policy's ``min_audience``)."""
        q = _in_audience(sa.select(sa.func.count()).select_from(recipients), countries, regions, tags)
        async with self.engine.connect() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def recipients_by_id(self, ids: Sequence[str]) -> list[Contact]:
        q = sa.select(*_CONTACT).where(recipients.c.id.in_(list(ids)))
        return [Contact(*row) for row in await self._read(partial(_lists, q=q))]
