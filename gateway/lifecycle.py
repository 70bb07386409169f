"""An advisory's life: its states, the one table of allowed moves, and the withdrawal rules.

::

    received ─▶ pending_approval ─▶ active ─▶ completed
                   │  │  │             │
                   │  │  └▶ returned   ├▶ cancelled   (a cancel naming it, from its sender or an
                   │  └▶ rejected      │               authority, or an operator's cancel)
                   └▶ cancelled/       ├▶ superseded  (a later version, or an update naming it)
                      superseded/      └▶ expired     (expires_at passed)
                      expired (approval timeout)

Approval (gateway/approval.py): an alert or update the policy names waits in ``pending_approval``
until a second person — an approver who is not its submitter — approves it (``active``), rejects it
or returns it for edit (``DECISIONS``, each with a reason); past ``approval.timeout_s`` it expires.
A cancel never waits for approval.

Withdrawals — what cancels, updates and later versions do to the advisories they name:

- a **cancel** withdraws every version of each advisory it references (``id`` or ``id@vN``): they
  become ``cancelled`` and their pending deliveries are cancelled; nothing is planned for them again;
- an **update** (``msg_type: update`` naming other ids, or simply a higher ``version`` of the same id)
  supersedes what it names: pending deliveries of the older versions are cancelled and the update is
  planned for the whole audience (who was notified gets the update; who was not gets only the newest);
- a cancel **outranks** a supersede: a superseded advisory can still be cancelled, never the reverse;
- a withdrawal that **overtakes** its advisory (the cancel arrives first) is remembered; the advisory,
  when it comes, is stored withdrawn and never planned — if the withdrawal's sender had authority;
- **authority**: an advisory may be cancelled or updated by its own sender, or by a sender configured
  as an authority over it (``intake.authorities``); anyone else's cancel or update is refused;
- **expiry** withdraws what has not been sent; it never touches a sent message (nor does a cancel).

The store applies these rules inside one transaction per advisory (``Store.accept``); the planner asks
``may_plan`` before each page and dispatch ``why_not_sent`` right before each partner request.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime


class AdvisoryState(enum.StrEnum):
    RECEIVED = "received"
    PENDING_APPROVAL = "pending_approval"
    ACTIVE = "active"
    COMPLETED = "completed"
    RETURNED = "returned"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    EXPIRED = "expired"


A = AdvisoryState

# from -> the states it may move to; every other move is refused (LifecycleError)
TRANSITIONS: Mapping[AdvisoryState, frozenset[AdvisoryState]] = {
    A.RECEIVED: frozenset({A.PENDING_APPROVAL, A.ACTIVE, A.CANCELLED, A.SUPERSEDED, A.EXPIRED, A.REJECTED}),
    A.PENDING_APPROVAL: frozenset({A.ACTIVE, A.RETURNED, A.REJECTED, A.CANCELLED, A.SUPERSEDED, A.EXPIRED}),
    A.ACTIVE: frozenset({A.COMPLETED, A.CANCELLED, A.SUPERSEDED, A.EXPIRED}),
    A.COMPLETED: frozenset({A.CANCELLED, A.SUPERSEDED, A.EXPIRED}),
    A.SUPERSEDED: frozenset({A.CANCELLED}),
    A.RETURNED: frozenset(),
    A.REJECTED: frozenset(),
    A.CANCELLED: frozenset(),
    A.EXPIRED: frozenset({A.CANCELLED}),
}


# what an approver may decide for an advisory in pending_approval: approve, reject, return for edit
DECISIONS = frozenset({A.ACTIVE, A.REJECTED, A.RETURNED})


class LifecycleError(ValueError):
    """A move the table does not allow."""


def can_move(current: AdvisoryState, new: AdvisoryState) -> bool:
    return new in TRANSITIONS[current]


def check_move(current: AdvisoryState, new: AdvisoryState) -> None:
    if not can_move(current, new):
        raise LifecycleError(f"an advisory {current.value} cannot become {new.value}")


def sources_of(target: AdvisoryState) -> list[str]:
    """The states that may move to ``target`` (for a guarded UPDATE … WHERE state IN …)."""
    return sorted(s.value for s, allowed in TRANSITIONS.items() if target in allowed)


def may_plan(state: AdvisoryState) -> bool:
    return state is A.ACTIVE


def may_send(state: AdvisoryState) -> bool:
    return state in {A.ACTIVE, A.COMPLETED}


def why_not_sent(state: AdvisoryState | None, expires_at: datetime, at: datetime) -> AdvisoryState | None:
    """Why an advisory's pending deliveries may not go out at ``at``: EXPIRED once ``expires_at``
    has passed, else its state if that is withdrawn; None if they may."""
    if expires_at <= at:
        return A.EXPIRED
    if state is not None and not may_send(state):
        return state
    return None


@dataclass(frozen=True, slots=True)
class Reference:
    """``id`` (every version) or ``id@vN`` (that version), as cancels and updates name advisories."""

    advisory_id: str
    version: int | None = None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        advisory_id, sep, rest = ref.partition("@")
        if sep and rest.startswith("v") and rest[1:].isdigit():
            return cls(advisory_id, int(rest[1:]))
        return cls(advisory_id)

    def __str__(self) -> str:
        return self.advisory_id if self.version is None else key(self.advisory_id, self.version)


def key(advisory_id: str, version: int) -> str:
    """``id@vN``: an advisory version in logs, Kafka keys and withdrawal records."""
    return f"{advisory_id}@v{version}"


def partition_key(advisory_id: str, msg_type: str, references: Sequence[str]) -> bytes:
    """The Kafka key of an advisory record: its id — or, for a cancel or update, the id of the first
    advisory it references, so that both share a partition and arrive in the order they were sent."""
    if msg_type in {"cancel", "update"} and references:
        return Reference.parse(str(references[0])).advisory_id.encode()
    return advisory_id.encode()


def withdrawal_by(msg_type: str) -> AdvisoryState | None:
    """What an advisory of ``msg_type`` does to the advisories it references."""
    return {"cancel": A.CANCELLED, "update": A.SUPERSEDED}.get(msg_type)


def has_authority(by: str, owner: str, authorities: Mapping[str, Sequence[str]]) -> bool:
    """Whether sender ``by`` may cancel or update an advisory sent by ``owner``."""
    return by == owner or owner in authorities.get(by, ())


def arrival_state(remembered: AdvisoryState | None, newer_version_stored: bool) -> AdvisoryState:
    """The state an alert or update is stored in: withdrawn if a withdrawal (with authority) named
    it before it came, or a later version of it is stored already; otherwise active."""
    if remembered is not None:
        return remembered
    return A.SUPERSEDED if newer_version_stored else A.ACTIVE
