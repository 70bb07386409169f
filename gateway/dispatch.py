"""Dispatch: chunks from the ``deliveries`` topics → per-channel lanes → render → adapter → store.

Each channel has its own **lane**: a queue and ``max_in_flight`` workers, so a slow, failing or
circuit-broken channel never holds another. In every lane, chunks of urgent advisories (from the
``deliveries.urgent.<channel>`` topics) go before bulk ones, and advisories of equal priority take turns.

Only deliveries still pending in the store are sent, and each carries its idempotency key, so a
chunk replayed after a crash never becomes a second notification. A partner without idempotency keys
(SMTP, SMPP) gets a delivery only after this instance has claimed it in the store (``claim_s``): two
instances holding the same delivery in two chunks never both send it. A chunk's offset is committed once
it and every chunk before it on its partition are finished (chunks finish out of order across lanes).
Consumption pauses while ``max_buffered_chunks`` chunks of a topic are unfinished (backpressure:
memory stays bounded whatever the audience), and resumes at half of it.

Retries use tenacity: exponential backoff with full jitter, at least the partner's Retry-After,
bounded by attempts and by the advisory's expiry. Right before each request — after the rate
limiter, the circuit breaker and any backoff — the advisory is read again: a cancelled, superseded or
expired advisory's batch is not sent. A training advisory's chunks go only to the gateway's own
sandbox partners (gateway/training.py), through the same lanes. On stop, workers finish the chunk
in hand within ``drain_timeout_s``; waits (backoff, store retries) end at once; unfinished chunks
stay uncommitted and are replayed by the next consumer.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_random_exponential

from channels.base import Adapter, Message, Result
from gateway import lifecycle, metrics
from gateway.errors import ContentError, RetryableError, Withdrawn
from gateway.lifecycle import AdvisoryState, why_not_sent
from gateway.logging import get_logger
from gateway.models import URGENT, Advisory, Chunk, Recipient, Status, instance_name, now
from gateway.rendering import Renderer
from gateway.retry import Stopped, pause, until_done
from gateway.settings import DispatchSettings
from gateway.store import Outcome, Store, WorkItem, working_for
from gateway.training import Training
from gateway.turns import UrgentFirst, take_turn

log = get_logger(__name__)

CLAIM_POLL_S = 1.0  # how often a delivery another instance has claimed is looked at again


class _WaitRetryAfter(wait_random_exponential):
    """Full-jitter exponential backoff, but never sooner than the partner's Retry-After."""

    def __call__(self, retry_state: RetryCallState) -> float:
        backoff = super().__call__(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        after = exc.retry_after if isinstance(exc, RetryableError) and exc.retry_after else 0.0
        return max(backoff, after)


def _outcome(r: Result) -> Outcome | None:
    if r.outcome == "accepted":
        return Outcome(r.delivery_id, Status.SENT, partner_id=r.partner_id)
    if r.outcome == "rejected":
        return Outcome(r.delivery_id, Status.FAILED, reason=r.reason)
    return None


@dataclass(frozen=True, slots=True)
class Job:
    chunk: Chunk
    tp: TopicPartition
    offset: int
    priority: int


class FairQueue:
    """Jobs by priority (lower first), then round-robin among advisories of equal priority."""

    def __init__(self) -> None:
        self._lanes: dict[int, OrderedDict[str, deque[Job]]] = {}
        self._size = 0
        self._ready = asyncio.Event()
        self._urgent_ready = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        return self._size

    def put(self, job: Job) -> None:
        key = lifecycle.key(job.chunk.advisory_id, job.chunk.version)
        self._lanes.setdefault(job.priority, OrderedDict()).setdefault(key, deque()).append(job)
        self._size += 1
        self._ready.set()
        if job.priority == URGENT:
            self._urgent_ready.set()

    def close(self) -> None:
        """Workers take no more jobs (what is queued stays uncommitted)."""
        self.closed = True
        self._ready.set()
        self._urgent_ready.set()

    async def get(self, urgent_only: bool = False) -> Job | None:
        """The next job (with ``urgent_only``, the next urgent one), or None once closed."""
        ready = self._urgent_ready if urgent_only else self._ready
        while not self.closed:
            lanes = {URGENT: self._lanes.get(URGENT, OrderedDict())} if urgent_only else self._lanes
            turn = take_turn(lanes)
            if turn is None:
                ready.clear()
                await ready.wait()
                continue
            key, jobs = turn
            job = jobs.popleft()
            if not jobs:
                del self._lanes[job.priority][key]
            self._size -= 1
            return job
        return None


class Offsets:
    """Per partition, the offsets fetched and whether each is finished; what may be committed."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, OrderedDict[int, bool]] = {}
        self._commit: dict[TopicPartition, int] = {}

    def fetched(self, tp: TopicPartition, offset: int) -> None:
        self._open.setdefault(tp, OrderedDict())[offset] = False

    def finished(self, tp: TopicPartition, offset: int) -> None:
        offsets = self._open.get(tp)
        if offsets is None or offset not in offsets:
            return  # the partition was revoked meanwhile
        offsets[offset] = True
        for first, done in list(offsets.items()):
            if not done:
                break
            del offsets[first]
            self._commit[tp] = first + 1

    def take_committable(self) -> dict[TopicPartition, int]:
        out, self._commit = self._commit, {}
        return out

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._open.pop(tp, None)
            self._commit.pop(tp, None)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        renderer: Renderer,
        adapters: Mapping[str, Adapter],
        settings: DispatchSettings,
        lanes: Mapping[str, tuple[int, str]],
        training: Training | None = None,
        urgent_first: UrgentFirst | None = None,
    ) -> None:
        self.store = store
        self.training = training
        # an urgent chunk is held from its fetch to its end; bulk steps wait meanwhile (gateway/turns.py)
        self.urgent_first = urgent_first or UrgentFirst()
        self._holds: dict[tuple[TopicPartition, int], int] = {}
        self.renderer = renderer
        self.adapters = adapters
        self.settings = settings
        self.topics = lanes  # topic -> (priority, channel)
        self.lanes = {channel: FairQueue() for channel in adapters}
        self.offsets = Offsets()
        self.buffered = dict.fromkeys(lanes, 0)  # per topic: chunks fetched and not finished
        self.most_buffered = 0  # the most chunks one topic had buffered at once (backpressure bounds it)
        self.stopping = asyncio.Event()
        self.in_hand: set[str] = set()  # delivery ids a worker of this process is sending now
        # this instance, as named on the deliveries it claims (partners without idempotency keys)
        self.me = instance_name()
        self._stored: dict[str, float | None] = {}  # advisory key -> when stored (dispatch latency)

    # -- one chunk ----------------------------------------------------------------------------

    async def _bulk_steps_aside(self, adv: Advisory) -> None:
        if adv.priority != URGENT:
            await self.urgent_first.bulk_turn()

    async def _still_wanted(self, adv: Advisory) -> None:
        """Raise Withdrawn if the advisory may no longer be sent (read from the store, not a cache)."""
        state = await self.store.advisory_state(adv.id, adv.version)
        why = why_not_sent(state, adv.expires_at, now())
        if why is AdvisoryState.EXPIRED:
            raise Withdrawn(Status.EXPIRED, "advisory expired")
        if why is not None:
            raise Withdrawn(Status.CANCELLED, f"advisory {why.value}")

    def _messages(
        self, adv: Advisory, adapter: Adapter, items: Sequence[WorkItem]
    ) -> tuple[list[Message], list[Outcome]]:
        """The chunk's messages, each rendered in the language chosen at planning (the one it is
        counted by; chosen again only if planning did not know it); a rendering that does not read
        the recipient is made once a language. A message that cannot be made fails alone."""
        messages: list[Message] = []
        failed: list[Outcome] = []
        shared: dict[str, Mapping[str, str] | None] = {}  # language → its rendering (None: per recipient)
        kind, parts = adapter.kind, adapter.parts
        for item in items:
            try:
                lang = item.language or self.renderer.choose_language(adv, item.recipient, kind, parts)
                if lang is None:
                    raise ContentError(f"no language to render for channel {adapter.channel!r}")
                if lang not in shared:
                    reads = self.renderer.uses_recipient(adv, lang, kind, parts)
                    shared[lang] = None if reads else self._render(adv, adapter, lang, None)
                rendered = shared[lang]
                if rendered is None:  # the template reads the recipient: rendered for each
                    rendered = self._render(adv, adapter, lang, item.recipient.recipient())
                address = item.recipient.address(kind)
                if address is None:
                    raise ContentError(f"recipient has no {kind} address")
            except ContentError as e:
                failed.append(Outcome(item.delivery_id, Status.FAILED, reason=str(e)))
                continue
            messages.append(
                Message(
                    item.delivery_id,
                    address,
                    rendered,
                    lang,
                    adv.id,
                    adv.version,
                    adv.priority,
                    adv.expires_at,
                )
            )
        return messages, failed

    def _render(
        self, adv: Advisory, adapter: Adapter, lang: str, recipient: Recipient | None
    ) -> Mapping[str, str]:
        return self.renderer.render(adv, lang, adapter.kind, adapter.parts, recipient, adapter.optional_parts)

    async def _adapter(self, adv: Advisory, channel: str) -> tuple[Adapter | None, str]:
        """The adapter for ``channel``: for a training advisory, only ever a sandbox partner's
        (gateway/training.py), whatever the live channels are configured to reach."""
        if adv.training:
            if self.training is None:
                return None, "training: this gateway has no training sandbox"
            adapter = (await self.training.adapters()).get(channel)
            return adapter, self.training.unavailable.get(channel, f"training: no sandbox for {channel!r}")
        return self.adapters.get(channel), f"channel {channel!r} is not configured on this gateway"

    async def handle_chunk(self, chunk: Chunk) -> None:
        adv = await self.store.advisory(chunk.advisory_id, chunk.version)
        if adv is None:
            log.error("dispatch.unknown_advisory", advisory_id=chunk.advisory_id, version=chunk.version)
            return
        adapter, reason = await self._adapter(adv, chunk.channel)
        if adapter is None:
            await self.store.record(Outcome(i, Status.FAILED, reason=reason) for i in chunk.ids)
            return
        try:
            await self._still_wanted(adv)
        except Withdrawn as w:
            await self.store.record(Outcome(i, Status(w.status), reason=w.reason) for i in chunk.ids)
            return
        # a delivery already in the hands of another worker is left to it: the same ids can come in
        # two chunks (a page planned again after a crash) and SMTP or SMPP would send both copies.
        # Claimed before the store is read, so the other worker has either claimed it or recorded it.
        await self._bulk_steps_aside(adv)
        ids = [i for i in chunk.ids if i not in self.in_hand]
        self.in_hand.update(ids)
        try:
            await self._send_chunk(adv, adapter, ids)
        finally:
            self.in_hand.difference_update(ids)

    async def _claimed_work(self, ids: Sequence[str]) -> list[WorkItem]:
        """The pending deliveries among ``ids`` this instance claimed in the store (for a partner
        without idempotency keys); one another instance holds is waited for until it is sent there
        or its claim runs out (its holder died), so it is neither sent twice nor lost."""
        items = await self.store.pending_work(ids, claim=self.me, lease_s=self.settings.claim_s)
        held = set(ids) - {i.delivery_id for i in items}
        while held:
            await pause(self.stopping, CLAIM_POLL_S)  # another instance is sending these: wait on it
            still = {i.delivery_id for i in await self.store.pending_work(sorted(held))}
            if not still:
                break
            mine = await self.store.pending_work(sorted(still), claim=self.me, lease_s=self.settings.claim_s)
            items += mine
            held = still - {i.delivery_id for i in mine}
        return items

    async def _send_chunk(self, adv: Advisory, adapter: Adapter, ids: Sequence[str]) -> None:
        if adapter.idempotent:
            await self._send_items(adv, adapter, await self.store.pending_work(ids))
            return
        # claimed for claim_s and renewed every third of it while this chunk is worked on: a claim
        # outlives its holder by at most claim_s (a restarted gateway waits no longer than that)
        renewing = asyncio.create_task(self._renew_claims(ids), name="dispatch-claims")
        try:
            await self._send_items(adv, adapter, await self._claimed_work(ids))
        finally:
            renewing.cancel()

    async def _renew_claims(self, ids: Sequence[str]) -> None:
        while True:
            await asyncio.sleep(self.settings.claim_s / 3)  # a lease's renewal interval: a timer
            await until_done(
                lambda: self.store.renew_claims(ids, self.me, self.settings.claim_s),
                "dispatch.claims_retrying",
                self.stopping,
            )

    async def _send_items(self, adv: Advisory, adapter: Adapter, items: Sequence[WorkItem]) -> None:
        await self._bulk_steps_aside(adv)
        messages, failed = self._messages(adv, adapter, items)
        if failed:
            await self.store.record(failed)
        for start in range(0, len(messages), adapter.batch_size):
            await self.send(adapter, adv, messages[start : start + adapter.batch_size])

    async def send(self, adapter: Adapter, adv: Advisory, batch: Sequence[Message]) -> None:
        """Send a batch until every message is accepted or rejected, attempts or time run out, or
        the advisory is withdrawn. Waiting for an open circuit costs no attempt."""
        remaining = list(batch)
        charged = 0

        def out_of_attempts(_: RetryCallState) -> bool:
            return charged >= self.settings.max_attempts

        retrying = AsyncRetrying(
            stop=out_of_attempts,
            wait=_WaitRetryAfter(multiplier=self.settings.backoff_initial_s, max=self.settings.backoff_max_s),
            retry=retry_if_exception_type(RetryableError),
            reraise=True,
            sleep=lambda seconds: pause(self.stopping, seconds),
        )
        recorded: set[str] = set()  # results the adapter reported (and we stored) as they came

        await self._bulk_steps_aside(adv)
        stored_at = await self._stored_at(adv)

        async def record_now(results: Sequence[Result]) -> None:
            await self._record_results(results, adapter, stored_at)
            recorded.update(r.delivery_id for r in results)

        try:
            async for attempt in retrying:
                with attempt:
                    results = await adapter.send(
                        remaining, before_request=lambda: self._still_wanted(adv), on_result=record_now
                    )
                    await self._record_results(
                        [r for r in results if r.delivery_id not in recorded], adapter, stored_at
                    )
                    # a message the adapter reported (and we recorded) is done, whatever came after
                    retry = [r for r in results if r.outcome == "retry" and r.delivery_id not in recorded]
                    if retry:
                        metrics.retries_total.labels(adapter.channel).inc(len(retry))
                        if any(r.costs_attempt for r in retry):
                            charged += 1
                            await self.store.note_retry(
                                [r.delivery_id for r in retry], retry[0].reason or "retry"
                            )
                        keep = {r.delivery_id for r in retry}
                        remaining = [m for m in remaining if m.delivery_id in keep]
                        after = max((r.retry_after or 0.0) for r in retry) or None
                        raise RetryableError(retry[0].reason or "partner asked to retry", after)
        except Withdrawn as w:
            await self.store.record(
                Outcome(m.delivery_id, Status(w.status), reason=w.reason) for m in remaining
            )
            log.info("delivery.withdrawn", channel=adapter.channel, advisory_id=adv.id, count=len(remaining))
        except RetryableError as e:
            reason = f"attempts exhausted ({self.settings.max_attempts}): {e.reason}"
            await self.store.record(Outcome(m.delivery_id, Status.FAILED, reason=reason) for m in remaining)
            log.warning(
                "delivery.failed",
                channel=adapter.channel,
                advisory_id=adv.id,
                count=len(remaining),
                reason=reason,
            )

    async def _stored_at(self, adv: Advisory) -> float | None:
        """When the advisory was stored (epoch seconds): where dispatch latency is measured from."""
        if adv.key not in self._stored:
            if len(self._stored) > 1000:
                self._stored.clear()
            self._stored[adv.key] = await self.store.received_at(adv.id, adv.version)
        return self._stored[adv.key]

    async def _record_results(
        self, results: Sequence[Result], adapter: Adapter, stored_at: float | None
    ) -> None:
        """What the partner answered, recorded before anything else happens to the batch: retried
        while the store is down (a crash in between re-sends with the same idempotency key)."""
        final = [o for o in map(_outcome, results) if o is not None]
        refs_channel = adapter.channel if adapter.receipts_by_partner_id else None
        if stored_at is not None:
            sent = sum(1 for o in final if o.status is Status.SENT)
            metrics.dispatch_latency_seconds.observe_same(adapter.channel, time.time() - stored_at, sent)
        if final:
            await asyncio.shield(
                until_done(
                    lambda: self.store.record(final, attempted=True, refs_channel=refs_channel),
                    "dispatch.record_retrying",
                    self.stopping,
                )
            )

    # -- lanes ----------------------------------------------------------------------------------

    async def _worker(self, lane: FairQueue, urgent_only: bool = False) -> None:
        while (job := await lane.get(urgent_only)) is not None:
            try:
                await self._run_job(job)
            except Stopped:
                return
            finally:
                hold = self._holds.pop((job.tp, job.offset), None)
                if hold is not None:
                    self.urgent_first.release(hold)
                self.buffered[job.tp.topic] -= 1
                metrics.dispatch_buffered_chunks.labels(job.tp.topic).dec()
            self.offsets.finished(job.tp, job.offset)

    async def _run_job(self, job: Job) -> None:
        """One chunk to the end; an infrastructure failure (store down) is retried, not skipped."""
        with working_for(job.priority):  # an urgent chunk's writes and reads go ahead of bulk ones
            await until_done(
                lambda: self.handle_chunk(job.chunk),
                "dispatch.retrying",
                self.stopping,
                advisory_id=job.chunk.advisory_id,
                channel=job.chunk.channel,
            )

    def _enqueue(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        self.offsets.fetched(tp, record.offset)
        try:
            chunk = Chunk.decode(record.value or b"")
        except (ValueError, KeyError, TypeError) as e:
            log.error("dispatch.bad_chunk", error=str(e), partition=tp.partition, offset=record.offset)
            self.offsets.finished(tp, record.offset)
            return
        # the topic names the lane; a chunk naming a channel this gateway lacks fails there, with why
        priority, channel = self.topics[tp.topic]
        lane = self.lanes[channel]
        self.buffered[tp.topic] = self.buffered.get(tp.topic, 0) + 1
        self.most_buffered = max(self.most_buffered, self.buffered[tp.topic])
        metrics.dispatch_buffered_chunks.labels(tp.topic).inc()
        if priority == URGENT:
            self._holds[(tp, record.offset)] = self.urgent_first.hold()
        lane.put(Job(chunk, tp, record.offset, priority))

    def _backpressure(self, consumer: AIOKafkaConsumer) -> int:
        """Pause each topic whose bound is reached; resume it at half. Returns how many chunks may
        be fetched now without any running topic passing its bound."""
        bound = self.settings.max_buffered_chunks
        assigned = consumer.assignment()
        paused = consumer.paused()
        room = bound
        for topic, buffered in self.buffered.items():
            tps = {tp for tp in assigned if tp.topic == topic}
            if buffered >= bound and not tps <= paused:
                consumer.pause(*tps)
                log.info("dispatch.paused", topic=topic, buffered=buffered)
            elif buffered <= bound // 2 and tps & paused:
                consumer.resume(*(tps & paused))
                log.info("dispatch.resumed", topic=topic, buffered=buffered)
            if tps and not tps <= consumer.paused():
                room = min(room, bound - buffered)
        return max(1, room)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        offsets = self.offsets.take_committable()
        assigned = consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await asyncio.shield(consumer.commit(offsets))
        except Exception as e:  # a rebalance took the partition: its new owner replays from the last commit
            log.warning("dispatch.commit_failed", error=f"{type(e).__name__}: {e}")
            self.offsets.forget(set(offsets))

    async def run(self, consumer: AIOKafkaConsumer, stopping: asyncio.Event) -> None:
        """Fetch chunks into the lanes until ``stopping``; then drain within ``drain_timeout_s``."""
        # per lane, max_in_flight workers take any chunk (urgent first) and one more takes only urgent
        # chunks: an urgent chunk never waits for a bulk chunk in hand (the partner's limit of open
        # requests, the adapter's, still holds)
        self._workers = []
        for channel, lane in self.lanes.items():
            n = self.adapters[channel].settings.max_in_flight
            self._workers += [
                asyncio.create_task(self._worker(lane, urgent_only=i == n), name=f"lane-{channel}-{i}")
                for i in range(n + 1)
            ]
        try:
            while not stopping.is_set():
                room = self._backpressure(consumer)
                fetched = await consumer.getmany(timeout_ms=200, max_records=room)
                for tp, records in fetched.items():
                    for record in records:
                        self._enqueue(tp, record)
                await self._commit(consumer)
        finally:
            self.stopping.set()
            for lane in self.lanes.values():
                lane.close()
            _, late = await asyncio.wait(self._workers, timeout=self.settings.drain_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            await self._commit(consumer)
            log.info("dispatch.drained", unfinished=len(late))
