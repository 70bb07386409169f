"""Planner: an advisory's audience → one delivery per recipient on the first channel that reaches
them → chunks of delivery ids on the ``deliveries`` topic.

The audience is read a page at a time (keyset paging), so a million recipients never sit in one list.
Planning is idempotent: delivery ids are deterministic and inserts of existing rows do nothing, so a
replay after a crash re-publishes the same chunks and dispatch sends only what is still pending.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaProducer

from gateway import metrics
from gateway.models import Advisory, Chunk, Recipient, Status, delivery_id
from gateway.store import Store


def choose_channel(
    adv: Advisory, r: Recipient, kinds: Mapping[str, str]
) -> tuple[str | None, dict[str, str]]:
    """The first channel of the advisory's cascade that reaches the recipient, and the channels
    passed over because the address there is unusable (channel → reason: recorded as skipped)."""
    unusable: dict[str, str] = {}
    for channel in adv.channels:
        kind = kinds[channel]
        if channel in r.opt_outs or kind in r.opt_outs or not r.address(kind):
            continue
        if kind == "sms" and r.phone_problem:
            unusable[channel] = r.phone_problem
            continue
        return channel, unusable
    return None, unusable


def _row(
    adv: Advisory, recipient_id: str, channel: str, status: Status, reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": delivery_id(adv.id, adv.version, recipient_id, channel),
        "advisory_id": adv.id,
        "version": adv.version,
        "recipient_id": recipient_id,
        "channel": channel,
        "status": status.value,
        "reason": reason,
    }


class Planner:
    def __init__(
        self, store: Store, producer: AIOKafkaProducer, topic: str, chunk_size: int, kinds: Mapping[str, str]
    ) -> None:
        self.store = store
        self.producer = producer
        self.topic = topic
        self.chunk_size = chunk_size
        self.kinds = kinds

    async def plan(self, adv: Advisory) -> int:
        """Plan every recipient of the audience; returns how many deliveries were planned."""
        after = ""
        chunk_no = 0
        total = 0
        aud = adv.audience
        while True:
            page = await self.store.audience_page(
                aud.countries, aud.regions, aud.tags, after, self.chunk_size
            )
            if not page:
                return total
            rows: list[dict[str, Any]] = []
            by_channel: dict[str, list[str]] = defaultdict(list)
            for r in page:
                channel, unusable = choose_channel(adv, r, self.kinds)
                for passed_over, reason in unusable.items():
                    rows.append(_row(adv, r.id, passed_over, Status.SKIPPED, reason))
                if channel is not None:
                    row = _row(adv, r.id, channel, Status.PLANNED)
                    by_channel[channel].append(row["id"])
                    rows.append(row)
                elif not unusable:
                    reason = "no address on any channel of the advisory"
                    rows.append(_row(adv, r.id, adv.channels[0], Status.SKIPPED, reason))
            await self.store.insert_deliveries(rows)
            sends = []
            for channel, ids in by_channel.items():
                chunk = Chunk(adv.id, adv.version, channel, tuple(ids))
                sends.append(
                    await self.producer.send(self.topic, chunk.encode(), key=f"{adv.key}/{chunk_no}".encode())
                )
                metrics.deliveries_planned_total.labels(channel).inc(len(ids))
            await asyncio.gather(*sends)
            await self.store.mark_queued([i for ids in by_channel.values() for i in ids])
            total += len(rows)
            chunk_no += 1
            after = page[-1].id
