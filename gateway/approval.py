"""The approval policy: which advisories wait for a second person before they go out.

A rule names any of ``severity``, ``urgency``, ``category`` (lists: the advisory's value is one of
them) and ``min_audience`` (the audience has at least this many recipients); a rule matches when
every condition it names holds, and a rule naming none matches every advisory. An alert or update
that any rule matches is stored ``pending_approval`` (gateway/lifecycle.py) and waits for an
approver who is not its submitter; a cancel never waits. ``timeout_s``: a version waiting longer
expires (the sweeper), so a forgotten draft can never go out days later.

The production profile (README) is one rule with no conditions: every alert and update needs a
second person. The embedded default has no rules, so a gateway fed only by signed Kafka records
behaves as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from gateway.models import Advisory


class ApprovalRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    severity: tuple[str, ...] = ()
    urgency: tuple[str, ...] = ()
    category: tuple[str, ...] = ()
    min_audience: int | None = Field(None, ge=0)


class ApprovalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[ApprovalRule, ...] = ()
    timeout_s: float = Field(3600.0, gt=0)


AudienceSize = Callable[[Advisory], Awaitable[int]]


async def required(adv: Advisory, rules: Sequence[ApprovalRule], audience_size: AudienceSize) -> str | None:
    """Why ``adv`` needs a second person (the first rule that matches, in words), or None."""
    if adv.msg_type == "cancel":
        return None
    size: int | None = None
    for n, rule in enumerate(rules):
        why = []
        if rule.severity:
            if adv.severity not in rule.severity:
                continue
            why.append(f"severity {adv.severity}")
        if rule.urgency:
            if adv.urgency not in rule.urgency:
                continue
            why.append(f"urgency {adv.urgency}")
        if rule.category:
            if adv.category not in rule.category:
                continue
            why.append(f"category {adv.category}")
        if rule.min_audience is not None:
            if adv.audience.segments:  # the partner holds the segment: its size is not ours to know
                why.append(f"partner segments (size unknown, counted as ≥ {rule.min_audience})")
            else:
                if size is None:
                    size = await audience_size(adv)
                if size < rule.min_audience:
                    continue
                why.append(f"audience {size} ≥ {rule.min_audience}")
        return f"approval.rules[{n}]: " + (", ".join(why) or "every advisory")
    return None
