"""The advisory lifecycle: one table of moves, and the withdrawal rules as the store applies them
in one transaction (on SQLite and PostgreSQL): cancel, update, supersede, overtaking, authority."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from gateway import audit
from gateway.errors import AuthorityError
from gateway.lifecycle import (
    TRANSITIONS,
    AdvisoryState,
    LifecycleError,
    Reference,
    check_move,
    has_authority,
    why_not_sent,
)
from gateway.models import Advisory, Recipient, now
from gateway.planner import plan_recipients, queued_by_channel
from gateway.store import Accepted, Store
from tests.conftest import advisory

A = AdvisoryState
KINDS = {"push": "push"}


def _adv(**over: Any) -> Advisory:
    return Advisory.model_validate(advisory(**over))


def test_every_state_has_a_row_and_final_states_go_nowhere_but_where_the_table_says() -> None:
    assert set(TRANSITIONS) == set(AdvisoryState)
    for final in (A.CANCELLED, A.REJECTED, A.RETURNED):
        assert TRANSITIONS[final] == frozenset()
    check_move(A.PENDING_APPROVAL, A.ACTIVE)
    with pytest.raises(LifecycleError, match="an advisory cancelled cannot become active"):
        check_move(A.CANCELLED, A.ACTIVE)
    with pytest.raises(LifecycleError):
        check_move(A.SUPERSEDED, A.ACTIVE)  # an update never brings back what it replaced


def test_references_name_every_version_or_one() -> None:
    assert Reference.parse("evac-1@v3") == Reference("evac-1", 3)
    assert str(Reference.parse("evac-1@v3")) == "evac-1@v3"
    assert Reference.parse("evac-1") == Reference("evac-1")
    assert Reference.parse("evac-1@latest") == Reference("evac-1")  # not a version: the whole advisory


def test_authority_is_the_sender_itself_or_a_configured_authority() -> None:
    authorities = {"mfa.kz": ("embassy.kz.tr",)}
    assert has_authority("embassy.kz.tr", "embassy.kz.tr", {})
    assert has_authority("mfa.kz", "embassy.kz.tr", authorities)
    assert not has_authority("embassy.kz.tr", "mfa.kz", authorities)


async def _accept(store: Store, adv: Advisory, authorities: dict[str, tuple[str, ...]]) -> Accepted:
    return await store.accept(adv, adv.model_dump(mode="json"), authorities)


async def _planned(store: Store, adv: Advisory, n: int = 3) -> list[str]:
    people = [Recipient(id=f"r{i}", app_user=f"u{i}", country="XA") for i in range(n)]
    await store.upsert_recipients(people)
    planned = plan_recipients(adv, people, KINDS)
    return queued_by_channel(planned, await store.insert_deliveries(adv.id, adv.version, planned))["push"]


async def _statuses(store: Store, ids: list[str]) -> list[str]:
    return [str((await store.delivery(i) or {}).get("status")) for i in ids]


async def test_a_cancel_withdraws_every_version_and_its_pending_deliveries(store: Store) -> None:
    alert = _adv()
    accepted = await _accept(store, alert, {})
    assert (accepted.outcome, accepted.state) == ("accepted", A.ACTIVE)
    ids = await _planned(store, alert)
    cancel = _adv(msg_type="cancel", references=[alert.id])
    done = await _accept(store, cancel, {})
    assert (done.state, done.withdrawn_pending) == (A.COMPLETED, 3)
    assert await store.advisory_state(alert.id, 1) is A.CANCELLED
    assert await _statuses(store, ids) == ["cancelled"] * 3
    again = await _accept(store, cancel, {})
    assert (again.outcome, again.state) == ("duplicate", None)


async def test_a_cancel_that_overtakes_its_alert_is_remembered(store: Store) -> None:
    alert = _adv()
    cancel = _adv(msg_type="cancel", references=[alert.id])
    await _accept(store, cancel, {})
    late = await _accept(store, alert, {})
    assert late.state is A.CANCELLED
    assert await store.unplanned() == []


async def test_an_overtaking_cancel_from_a_sender_without_authority_is_ignored(store: Store) -> None:
    alert = _adv()
    rogue_cancel = _adv(msg_type="cancel", references=[alert.id], sender="embassy.rogue")
    await _accept(store, rogue_cancel, {})
    late = await _accept(store, alert, {})
    assert late.state is A.ACTIVE


async def test_a_higher_version_supersedes_the_older_ones_pending_deliveries(store: Store) -> None:
    v1 = _adv()
    await _accept(store, v1, {})
    ids = await _planned(store, v1)
    v2 = _adv(id=v1.id, version=2)
    done = await _accept(store, v2, {})
    assert (done.state, done.withdrawn_pending) == (A.ACTIVE, 3)
    assert await store.advisory_state(v1.id, 1) is A.SUPERSEDED
    assert await _statuses(store, ids) == ["cancelled"] * 3
    old = _adv(id=v1.id, version=1)  # v1 replayed after v2: nothing changes
    assert (await _accept(store, old, {})).outcome == "duplicate"


async def test_an_older_version_arriving_after_a_newer_one_is_stored_superseded(store: Store) -> None:
    v2 = _adv(version=2)
    await _accept(store, v2, {})
    v1 = _adv(id=v2.id, version=1)
    assert (await _accept(store, v1, {})).state is A.SUPERSEDED


async def test_another_senders_cancel_or_update_is_refused_and_changes_nothing(store: Store) -> None:
    alert = _adv()
    await _accept(store, alert, {})
    ids = await _planned(store, alert)
    cancel = _adv(msg_type="cancel", references=[alert.id], sender="embassy.rogue")
    with pytest.raises(AuthorityError, match=r"'embassy.rogue' may not cancel"):
        await _accept(store, cancel, {})
    update = _adv(id=alert.id, version=2, sender="embassy.rogue")
    with pytest.raises(AuthorityError, match=r"may not update"):
        await _accept(store, update, {})
    same_id = _adv(id=alert.id, sender="embassy.rogue")  # its id and version, someone else's word
    with pytest.raises(AuthorityError):
        await _accept(store, same_id, {})
    assert await store.advisory_state(alert.id, 1) is A.ACTIVE
    assert await store.advisory_state(cancel.id, 1) is None  # the refused cancel was not stored
    assert await _statuses(store, ids) == ["queued"] * 3  # still to be sent
    # the same cancel from a configured authority is applied
    done = await _accept(store, cancel, {"embassy.rogue": (alert.sender,)})
    assert done.withdrawn_pending == 3


async def test_an_update_naming_another_advisory_supersedes_it(store: Store) -> None:
    first = _adv()
    await _accept(store, first, {})
    ids = await _planned(store, first)
    update = _adv(msg_type="update", references=[first.id])
    done = await _accept(store, update, {})
    assert (done.state, done.withdrawn_pending) == (A.ACTIVE, 3)
    assert await store.advisory_state(first.id, 1) is A.SUPERSEDED
    assert await _statuses(store, ids) == ["cancelled"] * 3
    cancel = _adv(msg_type="cancel", references=[first.id])  # a cancel still outranks the supersede
    await _accept(store, cancel, {})
    assert await store.advisory_state(first.id, 1) is A.CANCELLED


async def test_a_failure_inside_accept_leaves_nothing_half_done(store: Store) -> None:
    """One transaction: the record, the supersede and the withdrawals all happen, or none does."""
    v1 = _adv()
    await _accept(store, v1, {})
    ids = await _planned(store, v1)
    v2 = _adv(id=v1.id, version=2, msg_type="update", references=["other-1"])
    bad_body = {"not": {"json": object()}}  # the advisory row cannot be written
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the driver raises
        await store.accept(v2, bad_body, {})
    assert await store.advisory_state(v1.id, 1) is A.ACTIVE
    assert await store.advisory_state(v2.id, 2) is None
    assert await _statuses(store, ids) == ["queued"] * 3  # still to be sent
    done = await _accept(store, v2, {})  # the replay does all of it
    assert (done.state, done.withdrawn_pending) == (A.ACTIVE, 3)


def test_expiry_withholds_first_then_a_withdrawn_state_and_active_advisories_go_out() -> None:
    at = now()
    later, earlier = at + timedelta(minutes=1), at - timedelta(seconds=1)
    assert why_not_sent(A.ACTIVE, later, at) is None
    assert why_not_sent(A.COMPLETED, later, at) is None  # its last pages are still being sent
    assert why_not_sent(A.CANCELLED, later, at) is A.CANCELLED
    assert why_not_sent(A.SUPERSEDED, later, at) is A.SUPERSEDED
    assert why_not_sent(A.ACTIVE, earlier, at) is A.EXPIRED
    assert why_not_sent(A.CANCELLED, earlier, at) is A.EXPIRED


async def test_every_state_an_advisory_takes_is_an_audit_entry_in_the_same_transaction(store: Store) -> None:
    alert = _adv()
    await _accept(store, alert, {})
    update = _adv(id=alert.id, version=2)
    await _accept(store, update, {})
    cancel = _adv(msg_type="cancel", references=[alert.id])
    await _accept(store, cancel, {})
    v1 = [(e["actor"], e["action"], e["detail"].get("by")) for e in await audit.read(store.engine, alert.key)]
    sender = f"sender:{alert.sender}"  # straight from Kafka: no API token submitted it
    assert v1 == [
        (sender, "advisory.active", None),
        (sender, "advisory.superseded", update.key),
        (sender, "advisory.cancelled", cancel.key),
    ]
    v2 = [e["action"] for e in await audit.read(store.engine, update.key)]
    assert v2 == ["advisory.active", "advisory.cancelled"]
    rogue = _adv(msg_type="cancel", references=[alert.id], sender="embassy.rogue")
    with pytest.raises(AuthorityError):
        await _accept(store, rogue, {})
    assert await audit.read(store.engine, rogue.key) == []  # refused: nothing happened, nothing logged
