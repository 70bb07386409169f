"""Two-person approval, as the store applies it (SQLite and PostgreSQL): the policy's rules, waiting
in pending_approval, the second person's decision, the approval timeout, and an operator's cancel."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from gateway import audit
from gateway.approval import ApprovalRule, required
from gateway.errors import DecisionError, NotFoundError
from gateway.lifecycle import AdvisoryState
from gateway.models import Advisory, Recipient, now
from gateway.planner import plan_recipients, queued_by_channel
from gateway.store import Store
from tests.conftest import advisory

A = AdvisoryState
PRESS, APPROVER = "token:0000000000000001:press", "token:0000000000000002:approver"


def _adv(**over: Any) -> Advisory:
    return Advisory.model_validate(advisory(**over))


async def _size(n: int) -> Any:
    async def size(_: Advisory) -> int:
        return n

    return size


@pytest.mark.parametrize(
    ("rules", "over", "audience", "why"),
    [
        ([], {}, 5, None),
        ([{}], {}, 5, "approval.rules[0]: every advisory"),
        ([{"severity": ["extreme"]}], {"severity": "extreme"}, 5, "approval.rules[0]: severity extreme"),
        ([{"severity": ["extreme"]}], {"severity": "minor", "urgency": "future"}, 5, None),
        (
            [{"urgency": ["future"]}, {"category": ["security"], "min_audience": 10}],
            {"category": "security"},
            10,
            "approval.rules[1]: category security, audience 10 ≥ 10",
        ),
        ([{"min_audience": 10}], {}, 9, None),
        ([{}], {"msg_type": "cancel", "references": ["x"]}, 5, None),  # a cancel never waits
    ],
)
async def test_the_policy_names_the_rule_that_wants_a_second_person(
    rules: list[dict[str, Any]], over: dict[str, Any], audience: int, why: str | None
) -> None:
    adv = _adv(**over)
    parsed = [ApprovalRule.model_validate(r) for r in rules]
    assert await required(adv, parsed, await _size(audience)) == why


async def _people(store: Store, adv: Advisory, n: int = 3) -> list[str]:
    people = [Recipient(id=f"r{i}", app_user=f"u{i}", country="XA") for i in range(n)]
    await store.upsert_recipients(people)
    planned = plan_recipients(adv, people, {"push": "push"})
    return queued_by_channel(planned, await store.insert_deliveries(adv.id, adv.version, planned))["push"]


async def _pending(store: Store, **over: Any) -> Advisory:
    adv = _adv(**over)
    accepted = await store.accept(adv, adv.model_dump(mode="json"), {}, PRESS, "approval.rules[0]")
    assert accepted.state is A.PENDING_APPROVAL
    return adv


async def test_an_advisory_waits_until_someone_other_than_its_submitter_approves_it(store: Store) -> None:
    adv = await _pending(store)
    assert (adv.id, 1, "") not in await store.unplanned()  # nothing is planned while it waits
    with pytest.raises(DecisionError, match="a second person must decide") as refused:
        await store.decide(adv.id, None, A.ACTIVE, PRESS, None)
    assert refused.value.status == 403
    assert await store.advisory_state(adv.id, 1) is A.PENDING_APPROVAL
    done = await store.decide(adv.id, None, A.ACTIVE, APPROVER, None)
    assert (done.version, done.state) == (1, A.ACTIVE)
    assert (adv.id, 1, "") in await store.unplanned()  # the planner takes it from here
    with pytest.raises(DecisionError, match=r"no version waiting for approval \(.*@v1 is active\)"):
        await store.decide(adv.id, None, A.REJECTED, APPROVER, "too late")
    with pytest.raises(DecisionError, match="@v1 is active, not pending_approval"):
        await store.decide(adv.id, 1, A.REJECTED, APPROVER, "too late")
    trail = [(e["actor"], e["action"]) for e in await audit.read(store.engine, adv.key)]
    assert trail == [(PRESS, "advisory.pending_approval"), (APPROVER, "advisory.active")]


@pytest.mark.parametrize("decision", [A.REJECTED, A.RETURNED])
async def test_reject_and_return_are_final_for_the_version_and_keep_the_reason(
    store: Store, decision: AdvisoryState
) -> None:
    adv = await _pending(store)
    await store.decide(adv.id, 1, decision, APPROVER, "the hotline number is wrong")
    assert await store.advisory_state(adv.id, 1) is decision
    assert not await store.unplanned()
    entry = (await audit.read(store.engine, adv.key))[-1]
    assert (entry["action"], entry["detail"]["reason"]) == (
        f"advisory.{decision}",
        "the hotline number is wrong",
    )
    fixed = _adv(id=adv.id, version=2)  # the press office's corrected version waits again
    accepted = await store.accept(fixed, fixed.model_dump(mode="json"), {}, PRESS, "approval.rules[0]")
    assert accepted.state is A.PENDING_APPROVAL
    assert await store.advisory_state(adv.id, 1) is decision


async def test_decisions_name_what_does_not_exist(store: Store) -> None:
    with pytest.raises(NotFoundError, match="advisory_id: no advisory 'nope'"):
        await store.decide("nope", None, A.ACTIVE, APPROVER, None)
    adv = await _pending(store)
    with pytest.raises(NotFoundError, match=r"version: .* has no version 7"):
        await store.decide(adv.id, 7, A.ACTIVE, APPROVER, None)


async def test_a_version_waiting_past_the_timeout_expires_and_never_goes_out(store: Store) -> None:
    waiting = await _pending(store)
    fresh = await _pending(store)
    expired = await store.expire_unapproved(now() - timedelta(seconds=0))
    assert set(expired) == {waiting.key, fresh.key}
    assert await store.advisory_state(waiting.id, 1) is A.EXPIRED
    with pytest.raises(DecisionError, match="is expired, not pending_approval"):
        await store.decide(waiting.id, 1, A.ACTIVE, APPROVER, None)
    assert await store.expire_unapproved(now()) == []  # done once
    entry = (await audit.read(store.engine, waiting.key))[-1]
    assert (entry["actor"], entry["detail"]["reason"]) == ("gateway", "no approval in time")


async def test_an_operator_cancel_stops_a_live_advisory_at_once_and_is_final(store: Store) -> None:
    adv = _adv()
    await store.accept(adv, adv.model_dump(mode="json"), {})
    ids = await _people(store, adv)
    assert await store.cancel(adv.id, "token:0000000000000003:ops", "wrong crossing named") == 3
    assert await store.advisory_state(adv.id, 1) is A.CANCELLED
    assert {str((await store.delivery(i) or {})["status"]) for i in ids} == {"cancelled"}
    with pytest.raises(DecisionError, match="cannot be cancelled: it is cancelled"):
        await store.cancel(adv.id, "token:0000000000000003:ops", "again")
    later = _adv(id=adv.id, version=2)  # a later version of a cancelled advisory never goes out
    assert (await store.accept(later, later.model_dump(mode="json"), {})).state is A.CANCELLED
    entry = (await audit.read(store.engine, adv.key))[-1]
    assert (entry["actor"], entry["action"], entry["detail"]["reason"]) == (
        "token:0000000000000003:ops",
        "advisory.cancelled",
        "wrong crossing named",
    )
    with pytest.raises(NotFoundError):
        await store.cancel("never-sent", "token:0000000000000003:ops", "x")
