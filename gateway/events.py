"""Delivery events out: every applied status change of a delivery, to Kafka and to webhooks.

The store writes each change to the ``delivery_events`` outbox **in the same transaction** as the
change (triggers on ``deliveries``: planning, queueing, a partner's answer, a receipt, a cancel,
expiry, the sweeper, an operator's replay — whatever moved it). The publisher here takes the oldest
events in order, puts them on ``delivery-events`` — one record per advisory version and batch,
``{"events": [...]}``, keyed ``id@vN`` (so the events of one delivery stay in order on one
partition; a record per event cost more than the broadcast it described) — and only then removes
them from the outbox: at least once, never lost — a crash in between publishes them again
(consumers de-duplicate by ``(delivery_id, status)``). The schema is docs/delivery-events.md.

Webhooks (``events.webhooks``) get the same events in batches, signed with HMAC-SHA256 as partners
sign their receipts (``X-Timestamp``, ``X-Signature: v1=…``), retried with exponential backoff up to
``max_attempts``, then given up (logged, counted; the events stay on the topic). Each webhook has
its own bounded queue and worker: a slow receiver never holds dispatch — dispatch only writes the
outbox; when a queue is full the publisher waits, and the outbox (a table) holds what comes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from datetime import datetime

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from channels.base import hmac_headers
from gateway import metrics
from gateway.logging import get_logger
from gateway.models import now
from gateway.retry import Stopped, until_done
from gateway.settings import EventsSettings, WebhookSettings
from gateway.store import Event, Store

log = get_logger(__name__)

RECORD_EVENTS = 1000  # events in one record at most (~350 kB: under Kafka's 1 MB default)


def body(docs: Sequence[str]) -> bytes:
    """``{"events": [...]}`` of event documents as the store wrote them (JSON objects, joined as they
    are: a million deliveries' events are never parsed and encoded again here)."""
    return ('{"events":[' + ",".join(docs) + "]}").encode()


Records = list[tuple[str, bytes]]


def records(events: Sequence[Event]) -> Records:
    """The events as ``delivery-events`` records: one per advisory version (its key, ``id@vN``: every
    event of a delivery on one partition, in order), at most ``RECORD_EVENTS`` events each."""
    by_key: dict[str, list[str]] = {}
    for e in events:
        by_key.setdefault(e.key, []).append(e.doc)
    return [
        (key, body(docs[start : start + RECORD_EVENTS]))
        for key, docs in by_key.items()
        for start in range(0, len(docs), RECORD_EVENTS)
    ]


class _ReceiverError(Exception):
    pass


class Webhook:
    """One receiver: a bounded queue of batches and a worker posting them in order."""

    def __init__(self, name: str, settings: WebhookSettings, secret: str, queue_batches: int) -> None:
        self.name = name
        self.settings = settings
        self.secret = secret
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_batches)

    async def run(self, session: aiohttp.ClientSession, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            body = await self.queue.get()
            try:
                await self._post(session, body)
                metrics.webhook_deliveries_total.labels(self.name, "delivered").inc()
            except _ReceiverError as e:
                metrics.webhook_deliveries_total.labels(self.name, "given_up").inc()
                log.error(
                    "events.webhook_gave_up",
                    webhook=self.name,
                    attempts=self.settings.max_attempts,
                    error=str(e),
                )

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> None:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=wait_exponential(multiplier=0.2, max=30),
            retry=retry_if_exception_type(_ReceiverError),
            reraise=True,
        )
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        async for attempt in retrying:
            with attempt:
                headers = {"Content-Type": "application/json", **hmac_headers(self.secret, body)}
                try:
                    async with session.post(
                        self.settings.url, data=body, headers=headers, timeout=timeout
                    ) as r:
                        if r.status >= 300:
                            raise _ReceiverError(f"answered {r.status}")
                except (aiohttp.ClientError, TimeoutError) as e:
                    raise _ReceiverError(f"{type(e).__name__}: {e}") from e


class Publisher:
    def __init__(
        self,
        store: Store,
        producer: AIOKafkaProducer,
        topic: str,
        settings: EventsSettings,
        secrets: Mapping[str, str],
        session: aiohttp.ClientSession,
    ) -> None:
        self.store = store
        self.producer = producer
        self.topic = topic
        self.settings = settings
        self.session = session
        self.webhooks = [
            Webhook(name, hook, secrets[name], settings.queue_batches)
            for name, hook in settings.webhooks.items()
        ]

    async def publish_oldest(self) -> int:
        """The oldest events out of the outbox, published; how many. Records how long the oldest had
        waited (``gateway_delivery_events_lag_seconds``: an operator sees the events fall behind)."""
        taken = await self.store.take_events(self.settings.take, self.publish)
        if not taken:
            metrics.events_lag_seconds.set(0)
        return taken

    async def publish(self, events: Sequence[Event]) -> None:
        """On the topic (each record acknowledged), then queued for every webhook."""
        oldest = datetime.fromisoformat(orjson.loads(events[0].doc)["at"])
        metrics.events_lag_seconds.set(max(0.0, (now() - oldest).total_seconds()))
        sends = [
            await self.producer.send(self.topic, part, key=key.encode()) for key, part in records(events)
        ]
        await asyncio.gather(*sends)
        metrics.events_published_total.inc(len(events))
        if self.webhooks:  # in calls of up to events.batch
            size = self.settings.batch
            for start in range(0, len(events), size):
                batch = body([e.doc for e in events[start : start + size]])
                for hook in self.webhooks:
                    await hook.queue.put(batch)

    async def run(self, stopping: asyncio.Event) -> None:
        workers = [
            asyncio.create_task(h.run(self.session, stopping), name=f"webhook-{h.name}")
            for h in self.webhooks
        ]
        try:
            while not stopping.is_set():
                taken = await until_done(self.publish_oldest, "events.retrying", stopping)
                if taken < self.settings.take:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), self.settings.poll_s)
        except Stopped:
            return
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
