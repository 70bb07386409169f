"""Planner: an advisory's audience → one delivery per recipient on the first channel that reaches
them (created ``queued``) → chunks of delivery ids on the deliveries topics.

Planning runs a page at a time (keyset paging), so a million recipients never sit in one list, and
it is **scheduled**: urgent advisories (urgency ``immediate`` or severity ``extreme``) are planned
before bulk ones, and advisories of equal priority take turns page by page — an urgent advisory
waits at most for the bulk page in hand (``planner.page_size``), never for a large bulk advisory to
finish planning. Their chunks go to ``deliveries.urgent.<channel>``.

With several instances, an advisory is planned by one at a time (a lease in the store, renewed each
page): the others plan other advisories, and take it over from its stored cursor if its planner dies.

Progress is durable: after each page the cursor (last recipient id) is stored, and at start-up the
planner resumes every stored advisory whose planning had not finished. The next page is read while
one is made and published. Planning is idempotent:
delivery ids are deterministic and inserts of existing rows do nothing, so a page replayed after a
crash re-publishes the same chunks and dispatch sends only what is still pending. Before each page
the advisory's state is read again: a cancelled or superseded advisory stops being planned.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiokafka import AIOKafkaProducer

from gateway import kafka, lifecycle, metrics
from gateway.lifecycle import may_plan
from gateway.logging import get_logger
from gateway.models import URGENT, Advisory, Chunk, Contact, Reachable, Status, instance_name
from gateway.retry import Stopped, until_done
from gateway.settings import KafkaSettings
from gateway.store import Planned, Store, working_for
from gateway.turns import UrgentFirst, take_turn

log = get_logger(__name__)


def choose_channel(
    adv: Advisory, r: Reachable, kinds: Mapping[str, str], after: str | None = None
) -> tuple[str | None, dict[str, str]]:
    """The first channel of the advisory's cascade (after channel ``after``, if given) that reaches
    the recipient, and the channels passed over because the address there is unusable
    (channel → reason: recorded as skipped)."""
    unusable: dict[str, str] = {}
    channels = adv.channels[adv.channels.index(after) + 1 :] if after is not None else adv.channels
    for channel in channels:
        kind = kinds[channel]
        if channel in r.opt_outs or kind in r.opt_outs or not r.address(kind):
            continue
        if kind == "sms" and r.phone_problem:
            unusable[channel] = r.phone_problem
            continue
        return channel, unusable
    return None, unusable


# the language a recipient's message on a channel is rendered in (Renderer.choose_language, as
# dispatch will): counted per language from planning on. Without a renderer: "" (not known). It
# depends on the recipient's language chain only (plan_recipients asks once per chain and channel).
LanguageOf = Callable[[Advisory, Reachable, str], str]


def _unknown_language(adv: Advisory, r: Reachable, channel: str) -> str:
    return ""


def plan_recipients(
    adv: Advisory,
    page: Sequence[Reachable],
    kinds: Mapping[str, str],
    after: str | None = None,
    language: LanguageOf = _unknown_language,
) -> list[Planned]:
    """The deliveries to make for a page of recipients: the chosen channel queued, unusable ones
    skipped (with the reason)."""
    out: list[Planned] = []
    chosen: dict[tuple[str, tuple[str, ...]], str] = {}  # a language once per channel and language chain

    def language_on(r: Reachable, channel: str) -> str:
        key = (channel, r.languages)
        if key not in chosen:
            chosen[key] = language(adv, r, channel)
        return chosen[key]

    for r in page:
        channel, unusable = choose_channel(adv, r, kinds, after)
        for passed_over, reason in unusable.items():
            out.append(Planned(r.id, passed_over, Status.SKIPPED, language_on(r, passed_over), reason))
        if channel is not None:
            # made queued: its chunk is published before the planner moves past the page (a crash in
            # between plans the page again), so no second write moves it from planned to queued
            out.append(Planned(r.id, channel, Status.QUEUED, language_on(r, channel)))
        elif not unusable and after is None:
            reason = "no address on any channel of the advisory"
            first = adv.channels[0]
            out.append(Planned(r.id, first, Status.SKIPPED, language_on(r, first), reason))
    return out


def queued_by_channel(planned: Sequence[Planned], ids: Sequence[str]) -> dict[str, list[str]]:
    """The ids of the queued ones among ``planned`` (``ids`` in the same order), by channel: what
    goes on the lanes."""
    by_channel: dict[str, list[str]] = defaultdict(list)
    for p, i in zip(planned, ids, strict=True):
        if p.status is Status.QUEUED:
            by_channel[p.channel].append(i)
    return by_channel


@dataclass
class _Plan:
    adv: Advisory
    cursor: str
    planned: int = 0
    # the next page, being read while this one is made and published: (the cursor it is read after,
    # its read)
    ahead: tuple[str, asyncio.Future[list[Contact]]] | None = None

    def forget_ahead(self) -> None:
        if self.ahead is not None:
            self.ahead[1].cancel()
            self.ahead = None


def _retrieved(read: asyncio.Future[Any]) -> None:
    """A read ahead's failure is seen when the page is asked for (and not reported as lost)."""
    if not read.cancelled():
        read.exception()


# an advisory version's partner-side segment deliveries (gateway/segments.py: segment_rows)
SegmentRows = Callable[[Advisory], list[dict[str, Any]]]


class Planner:
    def __init__(
        self,
        store: Store,
        producer: AIOKafkaProducer,
        topics: KafkaSettings,
        chunk_size: int,
        kinds: Mapping[str, str],
        poll_s: float = 1.0,
        language: LanguageOf = _unknown_language,
        segments: SegmentRows | None = None,
        lease_s: float = 15.0,
        page_size: int | None = None,
        urgent_first: UrgentFirst | None = None,
    ) -> None:
        self.store = store
        # bulk pages wait while urgent work is in hand in this process (intake and dispatch hold it too)
        self.urgent_first = urgent_first or UrgentFirst()
        self._holds: dict[str, int] = {}  # urgent plans in hand → their hold
        self.page_size = page_size or chunk_size
        self.lease_s = lease_s
        # this instance, as named on the advisories it plans (planning is leased: one at a time)
        self.me = instance_name()
        self.segments = segments
        self.segments_planned: Callable[[], None] | None = None  # told when segments were planned
        self.language = language
        self.poll_s = poll_s
        self._next_poll = 0.0
        self.producer = producer
        self.topics = topics
        self.chunk_size = chunk_size
        self.kinds = kinds
        self._plans: dict[int, OrderedDict[str, _Plan]] = {}
        self._wakeup = {True: asyncio.Event(), False: asyncio.Event()}  # urgent loop, the other

    # -- scheduling -----------------------------------------------------------------------------

    def submit(self, adv: Advisory, cursor: str = "") -> None:
        """Plan ``adv`` (from ``cursor`` on) in its turn."""
        plans = self._plans.setdefault(adv.priority, OrderedDict())
        if adv.key not in plans:
            plans[adv.key] = _Plan(adv, cursor)
            if adv.priority == URGENT:
                self._holds[adv.key] = self.urgent_first.hold()
        self._wakeup[adv.priority == URGENT].set()

    def drop(self, advisory_id: str, below_version: int | None = None) -> None:
        """Stop planning an advisory (every version, or those below ``below_version``): it was
        cancelled or superseded. Its state in the store already says so; this saves the pages."""
        for plans in self._plans.values():
            for key in [
                k
                for k, p in plans.items()
                if p.adv.id == advisory_id and (below_version is None or p.adv.version < below_version)
            ]:
                plans.pop(key).forget_ahead()
                self._release(key)

    def _next(self, urgent: bool) -> _Plan | None:
        """The urgent plan, or the other plan, whose turn it is to plan a page (gateway/turns.py)."""
        turn = take_turn({p: plans for p, plans in self._plans.items() if (p == URGENT) == urgent})
        return None if turn is None else turn[1]

    async def run(self, stopping: asyncio.Event) -> None:
        """Plan page by page until ``stopping``: urgent advisories in a loop of their own, so an
        urgent advisory's first page never waits for a bulk page in hand (its writes take SQLite's
        next write turn: gateway/store/sqlite.py ``working_for``). The store is the schedule: unfinished
        plans are resumed at start-up, and advisories stored by any intake (this process or another)
        are picked up within ``poll_s``."""
        watcher = asyncio.create_task(self._wake_when(stopping))
        loops = [
            asyncio.create_task(
                self._plan(stopping, urgent), name=f"planner-{'urgent' if urgent else 'bulk'}"
            )
            for urgent in (True, False)
        ]
        try:
            await asyncio.gather(*loops)
        finally:
            watcher.cancel()
            for loop in loops:
                loop.cancel()
            for plans in self._plans.values():
                for plan in plans.values():
                    plan.forget_ahead()
            with contextlib.suppress(Exception):  # the store is down: the leases run out by themselves
                await self.store.release_planning(self.me)

    async def _plan(self, stopping: asyncio.Event, urgent: bool) -> None:
        wakeup = self._wakeup[urgent]
        with contextlib.suppress(Stopped):
            while not stopping.is_set():
                if not urgent:  # one loop looks at the store; it submits to both
                    await until_done(self._poll_store, "planner.retrying", stopping)
                plan = self._next(urgent)
                if plan is None:
                    wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wakeup.wait(), self.poll_s)
                    continue
                with working_for(plan.adv.priority):
                    await until_done(
                        partial(self.plan_page, plan), "planner.retrying", stopping, advisory_id=plan.adv.id
                    )

    async def _poll_store(self) -> None:
        """Submit stored advisories that are active and not fully planned, unless known already."""
        now_ = asyncio.get_running_loop().time()
        if now_ < self._next_poll:
            return
        self._next_poll = now_ + self.poll_s
        known = {key for plans in self._plans.values() for key in plans}
        for advisory_id, version, cursor in await self.store.unplanned():
            if lifecycle.key(advisory_id, version) in known:
                continue
            adv = await self.store.advisory(advisory_id, version)
            if adv is not None:
                self.submit(adv, cursor)

    async def _wake_when(self, stopping: asyncio.Event) -> None:
        await stopping.wait()
        for wakeup in self._wakeup.values():
            wakeup.set()

    def _done(self, plan: _Plan) -> None:
        plan.forget_ahead()
        self._plans.get(plan.adv.priority, OrderedDict()).pop(plan.adv.key, None)
        self._release(plan.adv.key)

    def _release(self, key: str) -> None:
        hold = self._holds.pop(key, None)
        if hold is not None:
            self.urgent_first.release(hold)

    async def _bulk_steps_aside(self, adv: Advisory) -> None:
        if adv.priority != URGENT:
            await self.urgent_first.bulk_turn()

    # -- one page -------------------------------------------------------------------------------

    async def plan_page(self, plan: _Plan) -> None:
        adv = plan.adv
        await self._bulk_steps_aside(adv)
        state = await self.store.advisory_state(adv.id, adv.version)
        if state is None or not may_plan(state):
            self._done(plan)
            return
        stored = await self.store.planning_cursor(adv.id, adv.version, self.me)
        if stored is None:  # another instance plans it: this one looks again when its lease runs out
            self._done(plan)
            return
        plan.cursor = max(plan.cursor, stored)  # another instance may have gone further before it died
        aud = adv.audience
        if plan.cursor == "" and aud.segments and self.segments is not None:
            # before the first page (a replay from the start plans them again: nothing changes)
            await self.store.plan_segments(self.segments(adv))
            if self.segments_planned is not None:
                self.segments_planned()
        page = await self._page(plan) if aud.in_directory else []
        if not page:
            await self.store.mark_planned(adv.id, adv.version)
            self._done(plan)
            log.info("advisory.planned", advisory_id=adv.id, version=adv.version, count=plan.planned)
            return
        read = asyncio.ensure_future(self._audience_after(adv, page[-1].id))
        read.add_done_callback(_retrieved)  # a failed read ahead is read again in its turn
        plan.ahead = (page[-1].id, read)
        await self._bulk_steps_aside(adv)
        planned = plan_recipients(adv, page, self.kinds, language=self.language)
        # the lease is taken with the page's rows: one write, and none if another instance took over
        ids = await self.store.insert_planned(adv.id, adv.version, planned, self.me, self.lease_s, stored)
        if ids is None:
            return  # its turn comes again: the cursor or the lease is read afresh
        await self.publish(adv, queued_by_channel(planned, ids), page[0].id)
        await self.store.page_published(adv.id, adv.version, page[-1].id)
        plan.cursor = page[-1].id
        plan.planned += len(planned)

    async def _page(self, plan: _Plan) -> list[Contact]:
        """The page after ``plan.cursor``: the one read ahead if it was read after the same cursor."""
        ahead, plan.ahead = plan.ahead, None
        if ahead is not None:
            after, read = ahead
            if after == plan.cursor:
                return await read
            read.cancel()
        return await self._audience_after(plan.adv, plan.cursor)

    async def _audience_after(self, adv: Advisory, cursor: str) -> list[Contact]:
        aud = adv.audience
        return await self.store.audience_page(aud.countries, aud.regions, aud.tags, cursor, self.page_size)

    async def publish(self, adv: Advisory, by_channel: Mapping[str, list[str]], key: str) -> None:
        """Chunks of queued deliveries onto the advisory's lane, each acknowledged by the broker."""
        sends = []
        for channel, ids in by_channel.items():
            topic = kafka.deliveries_topic(self.topics, channel, urgent=adv.priority == URGENT)
            for start in range(0, len(ids), self.chunk_size):
                chunk = Chunk(adv.id, adv.version, channel, tuple(ids[start : start + self.chunk_size]))
                record_key = f"{adv.key}/{key}/{channel}/{start}".encode()
                sends.append(await self.producer.send(topic, chunk.encode(), key=record_key))
            metrics.deliveries_planned_total.labels(channel).inc(len(ids))
        await asyncio.gather(*sends)
