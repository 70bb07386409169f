"""Planner: an advisory's audience → one delivery per recipient on the first channel that reaches
them → chunks of delivery ids on the ``deliveries`` topic.

The audience is read a page at a time (keyset paging), so a million recipients never sit in one list.
Planning is idempotent: delivery ids are deterministic and inserts of existing rows do nothing, so a
replay after a crash re-publishes the same chunks and dispatch sends only what is still pending.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaProducer

from gateway import metrics
from gateway.models import Advisory, Recipient, Status, delivery_id
from gateway.store import Store


def choose_channel(adv: Advisory, r: Recipient, kinds: Mapping[str, str]) -> str | None:
    """The first channel of the advisory's cascade that has an address for the recipient, not opted out."""
    for channel in adv.channels:
        if channel in r.opt_outs or kinds[channel] in r.opt_outs:
            continue
        if r.address(kinds[channel]):
            return channel
    return None


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
                channel = choose_channel(adv, r, self.kinds)
                did = delivery_id(adv.id, adv.version, r.id, channel or adv.channels[0])
                row = {
                    "id": did,
                    "advisory_id": adv.id,
                    "version": adv.version,
                    "recipient_id": r.id,
                    "channel": channel or adv.channels[0],
                    "status": Status.PLANNED.value,
                }
                if channel is None:
                    row |= {
                        "status": Status.SKIPPED.value,
                        "reason": "no address on any channel of the advisory",
                    }
                else:
                    by_channel[channel].append(did)
                rows.append(row)
            await self.store.insert_deliveries(rows)
            sends = []
            for channel, ids in by_channel.items():
                chunk = {"advisory_id": adv.id, "version": adv.version, "channel": channel, "ids": ids}
                sends.append(
                    await self.producer.send(
                        self.topic, json.dumps(chunk).encode(), key=f"{adv.key}/{chunk_no}".encode()
                    )
                )
                metrics.deliveries_planned_total.labels(channel).inc(len(ids))
            await asyncio.gather(*sends)
            await self.store.mark_queued([i for ids in by_channel.values() for i in ids])
            total += len(rows)
            chunk_no += 1
            after = page[-1].id
