"""Intake: advisories topic → decode → validate → verify signature → store → plan → commit.

A record that is not a usable advisory goes to the dead-letter topic with its original bytes and
the reason (headers ``reason``, ``error``, ``source``), and its offset is committed: the service
never dies of input. An offset is committed only after the advisory is durable; its plan is then
driven from the store by the planner's schedule (resumed after a crash), so an urgent advisory is
never stuck behind the planning of a large one. Replays are harmless (the advisory is stored once).

Cancels and updates: a cancel withdraws every version of the advisories it references and cancels
their pending deliveries at once; an update supersedes the earlier versions (and any advisory it
references): their pending deliveries are cancelled, and the update is planned for the whole
audience — who was notified gets the update, who was not gets only the newest. A cancel or update
that overtakes the advisory it names is remembered: that advisory, arriving later, is stored
withdrawn and never sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from gateway import metrics
from gateway.errors import DecodeError, ExpiredError, InputError, SchemaError
from gateway.logging import get_logger
from gateway.models import Advisory, now
from gateway.planner import Planner
from gateway.rendering import Renderer, Target
from gateway.settings import describe_validation_error
from gateway.signing import Verifier
from gateway.store import Store

log = get_logger(__name__)

RETRY_DELAY_S = 2.0


def decode(raw: bytes) -> dict[str, Any]:
    """Bytes from the topic → a JSON object, or DecodeError saying why not."""
    text = raw.lstrip()
    if text.startswith(b"<"):
        raise DecodeError("CAP 1.2 XML advisories are not accepted yet; send the JSON form")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DecodeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise DecodeError(f"an advisory is a JSON object, got {type(value).__name__}")
    return value


def parse(record: Mapping[str, Any]) -> Advisory:
    try:
        return Advisory.model_validate(record)
    except ValidationError as e:
        raise SchemaError(describe_validation_error(e)) from e


class Intake:
    def __init__(
        self,
        store: Store,
        planner: Planner,
        renderer: Renderer,
        verifier: Verifier | None,
        producer: AIOKafkaProducer,
        dlq_topic: str,
        targets: Mapping[str, Target],
    ) -> None:
        self.store = store
        self.planner = planner
        self.renderer = renderer
        self.verifier = verifier
        self.producer = producer
        self.dlq_topic = dlq_topic
        self.targets = targets

    def validate(self, raw: bytes) -> tuple[Advisory, dict[str, Any]]:
        """Everything that can be judged from the record alone; raises an InputError."""
        record = decode(raw)
        adv = parse(record)
        if self.verifier is not None:
            self.verifier.verify(record)
        if adv.msg_type != "cancel":
            if adv.expires_at <= now():
                raise ExpiredError(f"expires_at: {adv.expires_at.isoformat()} is already past")
            unknown = [c for c in adv.channels if c not in self.targets]
            if unknown:
                raise SchemaError(f"channels: not configured here: {', '.join(unknown)}")
            if adv.audience.segments:
                raise SchemaError("audience.segments: partner-side segments are not supported yet")
            self.renderer.check(adv, [self.targets[c] for c in adv.channels])
        return adv, record

    async def handle(self, raw: bytes) -> str:
        """Process one record; returns the outcome for the log. Input problems raise InputError."""
        adv, record = self.validate(raw)
        if await self.store.get_advisory_state(adv.id, adv.version) is not None:
            log.info("advisory.duplicate", advisory_id=adv.id, version=adv.version)
            return "duplicate"
        await self.store.save_advisory(adv, record)
        if adv.msg_type == "cancel":
            await self._withdraw(adv, "cancelled")
            return "cancel"
        withdrawn = await self.store.withdrawn_state(adv)
        if withdrawn is not None:
            await self.store.set_advisory_state(adv.id, adv.version, withdrawn)
            log.info("advisory.arrived_withdrawn", advisory_id=adv.id, version=adv.version, state=withdrawn)
            return withdrawn
        superseded = await self.store.supersede_older(adv)
        self.planner.drop(adv.id, below_version=adv.version)
        if adv.msg_type == "update":
            await self._withdraw(adv, "superseded")
        log.info(
            "advisory.accepted",
            advisory_id=adv.id,
            version=adv.version,
            sender=adv.sender,
            priority=adv.priority,
            superseded_pending=superseded,
        )
        self.planner.submit(adv)
        return "accepted"

    async def _withdraw(self, adv: Advisory, state: str) -> None:
        """Withdraw every advisory ``adv`` references (``id`` or ``id@vN``: every version of ``id``)."""
        count = 0
        for ref in adv.references:
            ref_id = ref.split("@", 1)[0]
            if ref_id == adv.id and state == "superseded":
                continue  # an update's own earlier versions: supersede_older did them
            count += await self.store.withdraw(ref_id, state, adv.key)
            self.planner.drop(ref_id)
        log.info(
            f"advisory.{state}",
            by=adv.key,
            references=list(adv.references),
            pending_cancelled=count,
        )

    async def dead_letter(self, msg: ConsumerRecord, error: InputError) -> None:
        reason = str(error)
        headers = [
            ("reason", reason.encode()),
            ("error", error.kind.encode()),
            ("source", f"{msg.topic}/{msg.partition}/{msg.offset}".encode()),
        ]
        await self.producer.send_and_wait(self.dlq_topic, msg.value, key=msg.key, headers=headers)
        metrics.advisories_total.labels("dead_letter").inc()
        log.warning(
            "advisory.dead_lettered",
            error=error.kind,
            reason=reason,
            offset=msg.offset,
            partition=msg.partition,
        )

    async def process(self, msg: ConsumerRecord) -> None:
        try:
            outcome = await self.handle(msg.value or b"")
            metrics.advisories_total.labels(outcome).inc()
        except InputError as e:
            await self.dead_letter(msg, e)

    async def run(self, consumer: AIOKafkaConsumer, stopping: asyncio.Event) -> None:
        """Consume until ``stopping``; every record is planned or dead-lettered, then committed."""
        while not stopping.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=16)
            for tp, records in batches.items():
                for msg in records:
                    if not await self._process_durably(consumer, tp, msg, stopping):
                        return

    async def _process_durably(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, msg: ConsumerRecord, stopping: asyncio.Event
    ) -> bool:
        """Process then commit one record; on an infrastructure error wait and try the same record again."""
        while True:
            try:
                await self.process(msg)
                await asyncio.shield(consumer.commit({tp: msg.offset + 1}))
                return True
            except Exception as e:  # the store or broker failed, not the input: keep the record, retry
                log.error("intake.retrying", error=f"{type(e).__name__}: {e}", offset=msg.offset)
                if stopping.is_set():
                    return False
                await asyncio.sleep(RETRY_DELAY_S)
