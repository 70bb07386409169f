"""Advisories: storing a version with what it withdraws (``accept``), decisions, cancels, expiry of
unapproved versions, and planning's cursor and schedule (the rules are gateway/lifecycle.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from gateway import audit as audit_log
from gateway.errors import AuthorityError, DecisionError, NotFoundError
from gateway.lifecycle import (
    DECISIONS,
    A,
    AdvisoryState,
    Reference,
    arrival_state,
    can_move,
    check_move,
    has_authority,
    key,
    sources_of,
    withdrawal_by,
)
from gateway.logging import get_logger
from gateway.models import Advisory, Status, aware, now
from gateway.schema import advisories, deliveries, withdrawals
from gateway.store.base import StoreBase
from gateway.store.deliveries import _IS_PENDING, _transition
from gateway.store.leases import _lease_free

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Accepted:
    """What storing an advisory did: ``outcome`` for the log and metrics (accepted, duplicate,
    cancelled, superseded, completed), its state (None for a duplicate), pending deliveries withdrawn."""

    outcome: str
    state: AdvisoryState | None
    withdrawn_pending: int


@dataclass(frozen=True, slots=True)
class By:
    """Who withdraws advisories: ``key`` names what did it (an advisory ``id@vN``, or an operator's
    cancel), ``sender`` is on whose authority (kept with a withdrawal that overtakes its advisory),
    ``actor`` goes into the audit log."""

    key: str
    sender: str
    actor: str


@dataclass(frozen=True, slots=True)
class Version:
    """One stored advisory version as the API shows it."""

    advisory_id: str
    version: int
    msg_type: str
    sender: str
    state: AdvisoryState
    training: bool
    submitted_by: str | None
    received_at: datetime
    expires_at: datetime


_VERSION_COLUMNS = (
    advisories.c.id,
    advisories.c.version,
    advisories.c.msg_type,
    advisories.c.sender,
    advisories.c.state,
    advisories.c.training,
    advisories.c.submitted_by,
    advisories.c.received_at,
    advisories.c.expires_at,
)


def _version(row: sa.RowMapping) -> Version:
    return Version(
        advisory_id=str(row["id"]),
        version=int(row["version"]),
        msg_type=str(row["msg_type"]),
        sender=str(row["sender"]),
        state=AdvisoryState(row["state"]),
        training=bool(row["training"]),
        submitted_by=row["submitted_by"],
        received_at=aware(row["received_at"]),
        expires_at=aware(row["expires_at"]),
    )


def _newest_only(q: sa.Select[Any]) -> sa.Select[Any]:
    """``q`` (over ``advisories``) restricted to each advisory's newest stored version."""
    newest = (
        sa.select(advisories.c.id, sa.func.max(advisories.c.version).label("version"))
        .group_by(advisories.c.id)
        .subquery()
    )
    return q.join(newest, sa.and_(advisories.c.id == newest.c.id, advisories.c.version == newest.c.version))


class AdvisoriesStore(StoreBase):
    """Advisory versions: stored with what they withdraw, decided on, cancelled, planned."""

    # -- advisories ---------------------------------------------------------------------------

    @staticmethod
    def _value(conn: sa.Connection, column: sa.Column[Any], advisory_id: str, version: int) -> Any:
        """One column of a stored advisory version, or None if it is not stored."""
        q = sa.select(column).where(advisories.c.id == advisory_id, advisories.c.version == version)
        return (conn.execute(q)).scalar()

    async def advisory_state(self, advisory_id: str, version: int) -> AdvisoryState | None:
        """The state of a stored advisory version, or None if it is not stored."""
        return await self._read(lambda conn: self._state_in(conn, advisory_id, version))

    async def accept(
        self,
        adv: Advisory,
        raw: Mapping[str, Any],
        authorities: Mapping[str, Sequence[str]],
        submitted_by: str | None = None,
        approval: str | None = None,
    ) -> Accepted:
        """Store an advisory version and apply what it carries — in **one transaction**: the record,
        the supersede of its older versions, the withdrawals it makes (cancel, update) and those
        made of it before it came, and its plan's schedule (``active``, not yet planned). A record
        stored already changes nothing (``duplicate``). A cancel or update of another sender's
        advisory without authority raises AuthorityError and stores nothing (gateway/lifecycle.py).
        ``approval``: why the approval policy wants a second person (gateway/approval.py): the
        advisory waits in ``pending_approval`` instead of becoming ``active``. ``submitted_by``:
        the API token that submitted it (else its sender), the one who may not approve it."""
        submitted_by = submitted_by or f"sender:{adv.sender}"

        def work(conn: sa.Connection) -> Accepted:
            self._check_authority(conn, adv, authorities)  # before all: a forged replay too
            if self._state_in(conn, adv.id, adv.version) is not None:
                return Accepted("duplicate", None, 0)
            withdraws = withdrawal_by(adv.msg_type)
            if withdraws is A.CANCELLED:
                state = A.COMPLETED  # a cancel's work is done once it is applied, below
            else:
                remembered = self._remembered(conn, adv, authorities)
                newer = (
                    conn.execute(
                        sa.select(sa.func.count())
                        .select_from(advisories)
                        .where(advisories.c.id == adv.id, advisories.c.version > adv.version)
                    )
                ).scalar_one()
                state = arrival_state(remembered, bool(newer))
                if state is A.ACTIVE and approval is not None:
                    state = A.PENDING_APPROVAL
            conn.execute(
                self._insert(advisories).values(
                    id=adv.id,
                    version=adv.version,
                    msg_type=adv.msg_type,
                    sender=adv.sender,
                    priority=adv.priority,
                    expires_at=adv.expires_at,
                    state=state.value,
                    body=dict(raw),
                    received_at=now(),
                    submitted_by=submitted_by,
                    training=adv.training,
                )
            )
            detail: dict[str, Any] = {"msg_type": adv.msg_type, "references": list(adv.references)}
            if state is A.PENDING_APPROVAL:
                detail["approval"] = approval
            if adv.training:
                detail["training"] = True
            audit_log.append(conn, submitted_by, f"advisory.{state.value}", adv.key, detail)
            by = By(adv.key, adv.sender, submitted_by)
            moved = 0
            if withdraws is not A.CANCELLED:
                older = (advisories.c.id == adv.id, advisories.c.version < adv.version)
                moved += self._withdraw_in(conn, older, A.SUPERSEDED, by)
            if withdraws is not None:
                for ref in map(Reference.parse, adv.references):
                    if ref.advisory_id == adv.id and withdraws is A.SUPERSEDED:
                        continue  # an update's own earlier versions: superseded just above
                    moved += self._withdraw_ref(conn, ref.advisory_id, withdraws, by)
            return Accepted(state.value if state is not A.ACTIVE else "accepted", state, moved)

        return await self._transact(work)

    async def decide(
        self, advisory_id: str, version: int | None, decision: AdvisoryState, actor: str, reason: str | None
    ) -> Version:
        """An approver's decision on a version waiting in ``pending_approval`` (the newest waiting
        one if ``version`` is None): ``active`` (approve), ``rejected`` or ``returned`` (with a
        reason). The submitter may not decide on their own (the two-person rule). One transaction
        with its audit entry; the planner picks an approved advisory up from the store."""
        if decision not in DECISIONS:
            raise DecisionError(f"decision: {decision.value} is not an approver's decision")

        def work(conn: sa.Connection) -> Version:
            rows = self._versions_in(conn, advisory_id)
            if not rows:
                raise NotFoundError(f"advisory_id: no advisory {advisory_id!r} is stored")
            if version is None:
                waiting = [v for v in rows if v.state is A.PENDING_APPROVAL]
                if not waiting:
                    newest = rows[-1]
                    raise DecisionError(
                        f"advisory {advisory_id!r} has no version waiting for approval "
                        f"({key(advisory_id, newest.version)} is {newest.state.value})"
                    )
                target = waiting[-1]
            else:
                found = [v for v in rows if v.version == version]
                if not found:
                    raise NotFoundError(f"version: advisory {advisory_id!r} has no version {version}")
                target = found[0]
            if target.state is not A.PENDING_APPROVAL:
                raise DecisionError(
                    f"{key(advisory_id, target.version)} is {target.state.value}, not pending_approval"
                )
            if target.submitted_by == actor:
                raise DecisionError(
                    "the submitter may not approve, reject or return their own advisory: "
                    "a second person must decide",
                    status=403,
                )
            check_move(target.state, decision)
            result = conn.execute(
                sa.update(advisories)
                .where(
                    advisories.c.id == advisory_id,
                    advisories.c.version == target.version,
                    advisories.c.state == A.PENDING_APPROVAL.value,
                )
                .values(state=decision.value)
            )
            if not result.rowcount:  # another decision got there first
                raise DecisionError(f"{key(advisory_id, target.version)} was decided meanwhile")
            detail = {"from": A.PENDING_APPROVAL.value, "reason": reason, "submitted_by": target.submitted_by}
            audit_log.append(
                conn, actor, f"advisory.{decision.value}", key(advisory_id, target.version), detail
            )
            return dataclasses.replace(target, state=decision)

        return await self._transact(work)

    async def cancel(self, advisory_id: str, actor: str, reason: str) -> int:
        """An operator's cancel of every version of an advisory, at once (no approval: stopping a
        wrong message never waits). Its pending deliveries are cancelled; returns how many.
        A later version arriving with this id is stored cancelled too, as after a cancel record."""

        def work(conn: sa.Connection) -> int:
            rows = self._versions_in(conn, advisory_id)
            if not rows:
                raise NotFoundError(f"advisory_id: no advisory {advisory_id!r} is stored")
            live = [v for v in rows if can_move(v.state, A.CANCELLED)]
            if not live:
                raise DecisionError(
                    f"advisory {advisory_id!r} cannot be cancelled: it is "
                    + ", ".join(sorted({v.state.value for v in rows}))
                )
            by = By(f"cancel:{actor}"[:128], rows[-1].sender, actor)
            return self._withdraw_ref(conn, advisory_id, A.CANCELLED, by, reason)

        return await self._transact(work)

    async def expire_unapproved(self, waiting_since: datetime) -> list[str]:
        """Versions in ``pending_approval`` since before ``waiting_since`` become ``expired`` (the
        approval timeout), each with an audit entry; returns their keys."""
        q = sa.select(advisories.c.id, advisories.c.version).where(
            advisories.c.state == A.PENDING_APPROVAL.value, advisories.c.received_at <= waiting_since
        )

        def work(conn: sa.Connection) -> list[str]:
            out = []
            for advisory_id, version in (conn.execute(q)).all():
                result = conn.execute(
                    sa.update(advisories)
                    .where(
                        advisories.c.id == advisory_id,
                        advisories.c.version == version,
                        advisories.c.state == A.PENDING_APPROVAL.value,
                    )
                    .values(state=A.EXPIRED.value)
                )
                if result.rowcount:
                    subject = key(str(advisory_id), int(version))
                    detail = {"from": A.PENDING_APPROVAL.value, "reason": "no approval in time"}
                    audit_log.append(conn, "gateway", f"advisory.{A.EXPIRED.value}", subject, detail)
                    out.append(subject)
            return out

        return await self._transact(work)

    async def versions(self, advisory_id: str) -> list[Version]:
        """Every stored version of an advisory, oldest first."""
        return await self._read(lambda conn: self._versions_in(conn, advisory_id))

    @staticmethod
    def _versions_in(conn: sa.Connection, advisory_id: str) -> list[Version]:
        q = sa.select(*_VERSION_COLUMNS).where(advisories.c.id == advisory_id).order_by(advisories.c.version)
        return [_version(r) for r in (conn.execute(q)).mappings().all()]

    async def newest_versions(
        self,
        states: Sequence[str] = (),
        sender: str | None = None,
        training: bool | None = None,
        before: datetime | None = None,
        limit: int = 100,
    ) -> list[Version]:
        """The newest version of each advisory, newest first, filtered by its state, its sender,
        training or not, and stored before ``before`` (to page)."""
        q = (
            _newest_only(sa.select(*_VERSION_COLUMNS))
            .order_by(advisories.c.received_at.desc(), advisories.c.id)
            .limit(limit)
        )
        if states:
            q = q.where(advisories.c.state.in_(list(states)))
        if sender is not None:
            q = q.where(advisories.c.sender == sender)
        if training is not None:
            q = q.where(advisories.c.training == training)
        if before is not None:
            q = q.where(advisories.c.received_at < before)
        async with self.engine.connect() as conn:
            return [_version(r) for r in (await conn.execute(q)).mappings().all()]

    def _state_in(self, conn: sa.Connection, advisory_id: str, version: int) -> AdvisoryState | None:
        state = self._value(conn, advisories.c.state, advisory_id, version)
        return None if state is None else AdvisoryState(state)

    async def check_authority(self, adv: Advisory, authorities: Mapping[str, Sequence[str]]) -> None:
        """AuthorityError if ``adv`` would be refused for authority by ``accept`` (the API asks first)."""
        await self._read(lambda conn: self._check_authority(conn, adv, authorities))

    def _check_authority(
        self, conn: sa.Connection, adv: Advisory, authorities: Mapping[str, Sequence[str]]
    ) -> None:
        """Another version of this id, or an advisory it cancels or updates, sent by someone over
        whom ``adv.sender`` has no authority → AuthorityError naming both."""
        named = {adv.id}
        if withdrawal_by(adv.msg_type) is not None:
            named |= {Reference.parse(r).advisory_id for r in adv.references}
        q = (
            sa.select(advisories.c.id, advisories.c.sender)
            .where(advisories.c.id.in_(sorted(named)))
            .distinct()
        )
        for advisory_id, owner in (conn.execute(q)).all():
            if not has_authority(adv.sender, str(owner), authorities):
                raise AuthorityError(
                    f"sender: {adv.sender!r} may not {'cancel' if adv.msg_type == 'cancel' else 'update'} "
                    f"{advisory_id!r}, sent by {owner!r} (intake.authorities names who may)"
                )

    def _remembered(
        self, conn: sa.Connection, adv: Advisory, authorities: Mapping[str, Sequence[str]]
    ) -> AdvisoryState | None:
        """A withdrawal that named ``adv`` before it arrived, if its sender had authority."""
        row = (
            conn.execute(
                sa.select(withdrawals.c.state, withdrawals.c.by_sender, withdrawals.c.by_id).where(
                    withdrawals.c.advisory_id == adv.id
                )
            )
        ).first()
        if row is None:
            return None
        by_sender = str(row.by_sender or adv.sender)  # rows from before by_sender was kept: trusted
        if not has_authority(by_sender, adv.sender, authorities):
            log.warning(
                "advisory.withdrawal_ignored",
                advisory_id=adv.id,
                by=row.by_id,
                by_sender=by_sender,
                sender=adv.sender,
                reason="the withdrawal's sender has no authority over this sender",
            )
            return None
        return AdvisoryState(row.state)

    def _withdraw_ref(
        self, conn: sa.Connection, advisory_id: str, state: AdvisoryState, by: By, reason: str | None = None
    ) -> int:
        """Remember that ``by`` withdrew ``advisory_id`` (every version, even one not received yet)
        and withdraw what is stored of it. A cancel outranks a supersede."""
        stmt = self._insert(withdrawals).values(
            advisory_id=advisory_id, state=state.value, by_id=by.key, by_sender=by.sender, at=now()
        )
        if state is A.CANCELLED:
            stmt = stmt.on_conflict_do_update(
                index_elements=[withdrawals.c.advisory_id],
                set_={"state": state.value, "by_id": by.key, "by_sender": by.sender},
            )
        else:
            stmt = stmt.on_conflict_do_nothing()
        conn.execute(stmt)
        return self._withdraw_in(conn, (advisories.c.id == advisory_id,), state, by, reason)

    def _withdraw_in(
        self,
        conn: sa.Connection,
        where: tuple[sa.ColumnElement[bool], ...],
        state: AdvisoryState,
        by: By,
        reason: str | None = None,
    ) -> int:
        """Versions matching ``where`` move to ``state`` where the lifecycle allows it (each move an
        audit entry); their pending deliveries are cancelled. Returns how many were cancelled."""
        versions = (
            conn.execute(sa.select(advisories.c.id, advisories.c.version, advisories.c.state).where(*where))
        ).all()
        movable = set(sources_of(state))
        for advisory_id, version, current in versions:
            if current in movable:
                detail = {"from": current, "by": by.key, **({"reason": reason} if reason else {})}
                audit_log.append(conn, by.actor, f"advisory.{state.value}", key(advisory_id, version), detail)
        conn.execute(
            sa.update(advisories)
            .where(*where, advisories.c.state.in_(sources_of(state)))
            .values(state=state.value)
        )
        moved = 0
        for advisory_id, version, _ in versions:
            moved += _transition(
                conn,
                (deliveries.c.advisory_id == advisory_id, deliveries.c.version == version, _IS_PENDING),
                Status.CANCELLED,
                f"advisory {state.value} by {by.key}",
            )
        return moved

    async def advisory(self, advisory_id: str, version: int) -> Advisory | None:
        """A stored advisory version, parsed once per process (a version never changes; its state,
        which does, is read with ``get_advisory_state``)."""
        key = (advisory_id, version)
        if key not in self._parsed:
            q = sa.select(advisories.c.body).where(
                advisories.c.id == advisory_id, advisories.c.version == version
            )
            async with self.engine.connect() as conn:
                body = (await conn.execute(q)).scalar()
            if body is None:
                return None
            self._parsed[key] = Advisory.model_validate(body)
        return self._parsed[key]

    async def _set_advisory(self, advisory_id: str, version: int, **values: Any) -> None:
        await self._execute(
            sa.update(advisories)
            .where(advisories.c.id == advisory_id, advisories.c.version == version)
            .values(**values)
        )

    async def received_at(self, advisory_id: str, version: int) -> float | None:
        """When an advisory version was stored (epoch seconds), or None."""
        at = await self._read(lambda conn: self._value(conn, advisories.c.received_at, advisory_id, version))
        return None if at is None else aware(at).timestamp()

    async def published(
        self, advisory_id: str | None = None, limit: int = 500, any_state: bool = False
    ) -> list[tuple[Advisory, datetime]]:
        """The newest version of each advisory the public may see — active or completed (a cancel
        too), not expired — with when it was stored; newest first. One advisory if ``advisory_id``;
        ``any_state``: whatever its state and expiry (what a reference names)."""
        q = (
            _newest_only(sa.select(advisories.c.id, advisories.c.version, advisories.c.received_at))
            .order_by(advisories.c.received_at.desc())
            .limit(limit)
        )
        if not any_state:
            q = q.where(
                advisories.c.state.in_([A.ACTIVE.value, A.COMPLETED.value]),
                advisories.c.expires_at > now(),
                advisories.c.training == sa.false(),  # a rehearsal is never public
            )
        if advisory_id is not None:
            q = q.where(advisories.c.id == advisory_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        out = []
        for advisory_id_, version, received in rows:
            adv = await self.advisory(str(advisory_id_), int(version))
            if adv is not None:
                out.append((adv, aware(received)))
        return out

    async def plan_finished(self, advisory_id: str, version: int) -> bool:
        return bool(
            await self._read(lambda conn: self._value(conn, advisories.c.planned, advisory_id, version))
        )

    async def mark_planned(self, advisory_id: str, version: int) -> None:
        await self._set_advisory(advisory_id, version, planned=True)

    async def page_published(self, advisory_id: str, version: int, cursor: str) -> None:
        """A planned page is on the topic: the advisory's planning cursor moves past it."""
        await self._set_advisory(advisory_id, version, plan_cursor=cursor)

    async def planning_cursor(self, advisory_id: str, version: int, planner: str) -> str | None:
        """The stored planning cursor of an advisory version, if ``planner`` may plan it (nobody holds
        the lease, ``planner`` does, or the holder's has run out); None if another instance holds it."""
        t = advisories.c
        q = sa.select(t.plan_cursor).where(
            t.id == advisory_id, t.version == version, _lease_free(planner, now())
        )
        cursor = await self._read(lambda conn: conn.execute(q).scalar_one_or_none())
        return None if cursor is None else str(cursor)

    async def release_planning(self, planner: str) -> None:
        """Give up every lease ``planner`` holds (a graceful stop): another instance goes on at once."""
        async with self._begin() as conn:
            await conn.execute(
                sa.update(advisories).where(advisories.c.planner == planner).values(plan_lease_until=now())
            )

    async def unplanned(self) -> list[tuple[str, int, str]]:
        """Active advisories whose planning has not finished: (id, version, cursor to resume after)."""
        q = sa.select(advisories.c.id, advisories.c.version, advisories.c.plan_cursor).where(
            advisories.c.state == A.ACTIVE.value,
            advisories.c.planned == sa.false(),
            advisories.c.msg_type != "cancel",
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [(str(i), int(v), str(c)) for i, v, c in rows]
