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
withdrawn and never sent. Only the advisory's sender (or an authority over it) may cancel or update
it. All of it happens in one transaction (``Store.accept``); the rules are gateway/lifecycle.py.

Whatever a record raises while it is decoded, validated, verified or render-checked is the record's
fault (``Stage``) and goes to the DLQ; only store and broker failures are retried
(``retry.until_done``), and a commit for a partition lost in a rebalance is dropped.

Approval: an alert or update the approval policy names (gateway/approval.py) is stored
``pending_approval``; the record header ``submitted-by`` (set by the API: the submitting token)
says who may not approve it. The press office's API (gateway/submissions.py) runs ``validate``
before a submission reaches the topic, so what it accepts is what intake accepts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
    UnsupportedCodecError,
)
from pydantic import ValidationError

from gateway import approval, audit, metrics
from gateway.approval import ApprovalSettings
from gateway.cap import is_cap, parse_cap
from gateway.errors import (
    ContentError,
    DecodeError,
    ExpiredError,
    InputError,
    SchemaError,
    SignatureError,
    UnreadableError,
)
from gateway.lifecycle import Reference, may_plan, withdrawal_by
from gateway.limits import load_json
from gateway.logging import get_logger
from gateway.models import URGENT, Advisory, now
from gateway.planner import Planner
from gateway.rendering import Renderer, Target
from gateway.retry import Stopped, until_done
from gateway.settings import InputLimits, IntakeSettings, describe_validation_error
from gateway.signing import SIGNATURE_HEADER, Verifier
from gateway.store import Store, working_for
from gateway.xmldsig import XmlDsig, has_signature

SUBMITTED_BY_HEADER = "submitted-by"  # the API token that submitted a record (the API sets it)

log = get_logger(__name__)

# what the Kafka client raises for a batch it cannot read: raised again at every fetch of it
UNREADABLE = (CorruptRecordException, UnsupportedCodecError)
FIND_UNREADABLE_MS = 250  # how long each partition is asked for its next record when finding it


class Stage:
    """Input judged where it fails: whatever a stage raises is the record's fault, with this kind.

    ``json.loads`` raises RecursionError, a template filter TypeError, a model validator anything:
    the class of the exception says nothing about whose fault it is; the stage that raised does.
    InputErrors pass through as they are; any other exception becomes ``error_class`` with its text.
    """

    def __init__(self, error_class: type[InputError], what: str) -> None:
        self.error_class = error_class
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, _t: type[BaseException] | None, e: BaseException | None, _tb: object) -> None:
        if e is None or isinstance(e, InputError) or not isinstance(e, Exception):
            return
        text = str(e)[:300] or "(no message)"
        raise self.error_class(f"{self.what}: {type(e).__name__}: {text}") from e


def decode(raw: bytes, limits: InputLimits) -> dict[str, Any]:
    """JSON bytes from the topic → a JSON object within ``limits``, or DecodeError saying why not."""
    value = load_json(raw, limits)
    if not isinstance(value, dict):
        raise DecodeError(f"an advisory is a JSON object, got {type(value).__name__}")
    return value


def parse(record: Mapping[str, Any], limits: InputLimits | None = None) -> Advisory:
    """A decoded record → an Advisory, or SchemaError naming the field (and any limit passed)."""
    try:
        adv = Advisory.model_validate(record)
    except ValidationError as e:
        raise SchemaError(describe_validation_error(e)) from e
    if limits is not None:
        if adv.version > limits.max_version:
            raise SchemaError(f"version: {adv.version} is above the limit {limits.max_version}")
        if len(adv.channels) > limits.max_channels:
            raise SchemaError(f"channels: {len(adv.channels)} channels; the limit is {limits.max_channels}")
        for field, n in (("content", len(adv.content)), ("languages", len(adv.languages))):
            if n > limits.max_languages:
                raise SchemaError(f"{field}: {n} languages; the limit is {limits.max_languages}")
    return adv


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
        settings: IntakeSettings,
        approval_settings: ApprovalSettings | None = None,
    ) -> None:
        self.store = store
        self.planner = planner
        self.renderer = renderer
        self.verifier = verifier
        self.producer = producer
        self.dlq_topic = dlq_topic
        self.targets = targets
        self.settings = settings
        self.approval = approval_settings or ApprovalSettings()
        self.xmldsig = XmlDsig(settings.xmldsig)

    def validate(
        self, raw: bytes, headers: Mapping[str, bytes] | None = None
    ) -> tuple[Advisory, dict[str, Any]]:
        """Everything that can be judged from the record alone; raises an InputError, whatever
        went wrong inside (see ``Stage``). A CAP 1.2 document (gateway/cap.py) is signed by a
        detached Ed25519 signature over its bytes, in the record header ``signature``."""
        limits = self.settings.limits
        cap = is_cap(raw)
        with Stage(DecodeError, "decode"):
            record = parse_cap(raw, limits, self.settings.cap_channels) if cap else decode(raw, limits)
        with Stage(SchemaError, "validate"):
            adv = parse(record, limits)
        if self.verifier is not None:
            with Stage(SignatureError, "signature"):
                if cap:
                    self._verify_cap(adv.sender, raw, record, headers or {})
                else:
                    self.verifier.verify(record)
        if adv.msg_type != "cancel":
            if adv.expires_at <= now():
                raise ExpiredError(f"expires_at: {adv.expires_at.isoformat()} is already past")
            unknown = [c for c in adv.channels if c not in self.targets]
            if unknown:
                raise SchemaError(f"channels: not configured here: {', '.join(unknown)}")
            self._check_segments(adv)
            with Stage(ContentError, f"render check of {adv.template or 'inline content'}"):
                segment_channels = [s.channel for s in adv.audience.segments if s.channel not in adv.channels]
                self.renderer.check(adv, [self.targets[c] for c in (*adv.channels, *segment_channels)])
        return adv, record

    def _check_segments(self, adv: Advisory) -> None:
        """Each partner segment on a configured channel whose partner takes segment requests."""
        for n, ref in enumerate(adv.audience.segments):
            target = self.targets.get(ref.channel)
            if target is None:
                raise SchemaError(f"audience.segments[{n}].channel: {ref.channel!r} is not configured here")
            if not getattr(target, "segments", False):
                raise SchemaError(
                    f"audience.segments[{n}].channel: {ref.channel!r} takes no segment requests "
                    "(docs/partner-push-api.md, Segments)"
                )
            if adv.training:
                raise SchemaError(
                    f"audience.segments[{n}]: a training advisory never reaches a partner's own audience"
                )

    def _verify_cap(
        self, sender: str, raw: bytes, record: Mapping[str, Any], headers: Mapping[str, bytes]
    ) -> None:
        """An enveloped XML-DSig signature where the sender has certificates (gateway/xmldsig.py),
        else — unless its policy requires XML-DSig — the detached Ed25519 header."""
        assert self.verifier is not None
        if self.xmldsig.applies(sender):
            if has_signature(raw):
                signed = self.xmldsig.verify(sender, raw)
                if parse_cap(signed, self.settings.limits, self.settings.cap_channels) != record:
                    raise SignatureError("Signature: what the signature covers is not this alert")
                return
            if self.xmldsig.policies[sender] == "required":
                raise SignatureError(
                    f"Signature: {sender!r} must sign its CAP documents with XML-DSig "
                    "(intake.xmldsig policy: required); this one carries no <Signature>"
                )
        signature = headers.get(SIGNATURE_HEADER, b"").decode("ascii", "replace")
        self.verifier.verify_document(sender, signature, raw)

    async def audience_size(self, adv: Advisory) -> int:
        a = adv.audience
        return await self.store.audience_size(a.countries, a.regions, a.tags)

    async def handle(self, raw: bytes, headers: Mapping[str, bytes] | None = None) -> str:
        """Process one record; returns the outcome for the log. Input problems raise InputError;
        anything else (the store, the broker) is an infrastructure failure and is retried."""
        adv, record = self.validate(raw, headers)
        if adv.priority == URGENT:  # bulk work steps aside from here (gateway/turns.py UrgentFirst)
            with self.planner.urgent_first.holding():
                return await self._store(adv, record, headers)
        return await self._store(adv, record, headers)

    async def _store(self, adv: Advisory, record: dict[str, Any], headers: Mapping[str, bytes] | None) -> str:
        why = await approval.required(adv, self.approval.rules, self.audience_size)
        submitter = (headers or {}).get(SUBMITTED_BY_HEADER, b"").decode("utf-8", "replace")[:200] or None
        with working_for(adv.priority):
            accepted = await self.store.accept(adv, record, self.settings.authorities, submitter, why)
        if accepted.state is None:
            log.info("advisory.duplicate", advisory_id=adv.id, version=adv.version)
            return accepted.outcome
        if withdrawal_by(adv.msg_type) is not None:  # the store has withdrawn them; spare the pages
            for ref in adv.references:
                self.planner.drop(Reference.parse(ref).advisory_id)
        self.planner.drop(adv.id, below_version=adv.version)
        log.info(
            "advisory.stored",
            advisory_id=adv.id,
            version=adv.version,
            msg_type=adv.msg_type,
            sender=adv.sender,
            state=accepted.state.value,
            priority=adv.priority,
            references=list(adv.references),
            withdrawn_pending=accepted.withdrawn_pending,
        )
        if may_plan(accepted.state):
            self.planner.submit(adv)
        return accepted.outcome

    async def dead_letter(self, msg: ConsumerRecord, error: InputError) -> None:
        reason = str(error)[:1000]
        headers = [
            ("reason", reason.encode()),
            ("error", error.kind.encode()),
            ("source", f"{msg.topic}/{msg.partition}/{msg.offset}".encode()),
        ]
        await self.producer.send_and_wait(self.dlq_topic, msg.value, key=msg.key, headers=headers)
        source = f"{msg.topic}/{msg.partition}/{msg.offset}"
        async with self.store.begin_write() as conn:  # the console's dead-letter list, any instance
            detail = {"error": error.kind, "reason": reason[:300]}
            await conn.run_sync(audit.append, "intake", "record.dead_lettered", f"dlq:{source}", detail)
        metrics.advisories_total.labels("dead_letter").inc()
        metrics.dead_letters_total.labels(error.kind).inc()
        log.warning(
            "advisory.dead_lettered",
            error=error.kind,
            reason=reason,
            offset=msg.offset,
            partition=msg.partition,
        )

    async def process(self, msg: ConsumerRecord) -> None:
        try:
            outcome = await self.handle(msg.value or b"", dict(msg.headers or ()))
            metrics.advisories_total.labels(outcome).inc()
        except InputError as e:
            await self.dead_letter(msg, e)

    async def run(self, consumer: AIOKafkaConsumer, stopping: asyncio.Event) -> None:
        """Consume until ``stopping``; every record is stored or dead-lettered, then committed.
        Records of a partition revoked meanwhile are left to its new owner."""
        try:
            while not stopping.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=500, max_records=16)
                except UNREADABLE as e:
                    await self._past_unreadable(consumer, e, stopping)
                    continue
                await self._take(consumer, batches, stopping)
        except Stopped:
            return

    async def _take(
        self,
        consumer: AIOKafkaConsumer,
        batches: Mapping[TopicPartition, list[ConsumerRecord]],
        stopping: asyncio.Event,
    ) -> None:
        for tp, records in batches.items():
            for msg in records:
                if tp not in consumer.assignment():
                    log.info("intake.partition_revoked", partition=tp.partition, left=len(records))
                    break
                await self._settle(consumer, tp, msg.offset, partial(self.process, msg), stopping)

    async def _settle(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        offset: int,
        handle: Callable[[], Awaitable[None]],
        stopping: asyncio.Event,
    ) -> None:
        """The record at ``offset`` handled (stored, or dead-lettered) until done, then committed."""
        await until_done(handle, "intake.retrying", stopping, offset=offset)
        await until_done(
            partial(self._commit, consumer, tp, offset + 1), "intake.commit_retrying", stopping, offset=offset
        )

    async def _past_unreadable(
        self, consumer: AIOKafkaConsumer, error: Exception, stopping: asyncio.Event
    ) -> None:
        """A batch the client cannot read (``UNREADABLE``) is refused at every fetch, and the error
        does not say whose partition it is in. Ask each partition for its records one at a time
        (taking those it has, as ever) until one raises: that partition's position is the first
        offset it cannot read. Dead-letter that offset by its place and go past it; a damaged batch
        of several records is passed one offset at a time, each dead-lettered."""
        log.warning("intake.unreadable_batch", error=type(error).__name__, reason=str(error)[:300])
        for tp in sorted(consumer.assignment()):
            while not stopping.is_set() and tp in consumer.assignment():  # not one a rebalance took
                try:
                    got = await consumer.getmany(tp, timeout_ms=FIND_UNREADABLE_MS, max_records=1)
                except UNREADABLE as e:
                    offset = await consumer.position(tp)
                    place = ConsumerRecord(
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=offset,
                        timestamp=-1,
                        timestamp_type=0,
                        key=None,
                        value=b"",  # unreadable: the dead letter says where it is
                        checksum=None,
                        serialized_key_size=0,
                        serialized_value_size=0,
                        headers=(),
                    )
                    unreadable = UnreadableError(f"{type(e).__name__}: {e}")
                    consumer.seek(tp, offset + 1)  # committed only once dead-lettered
                    await self._settle(
                        consumer, tp, offset, partial(self.dead_letter, place, unreadable), stopping
                    )
                    return
                if not got:
                    break  # nothing more in this partition now: not the one
                await self._take(consumer, got, stopping)

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        """Commit ``offset``; for a partition this consumer no longer owns (a rebalance moved it)
        the commit is dropped: its new owner replays the record, and storing it again changes nothing."""
        if tp not in consumer.assignment():
            log.info("intake.commit_dropped", partition=tp.partition, offset=offset)
            return
        try:
            await asyncio.shield(consumer.commit({tp: offset}))
        except (CommitFailedError, IllegalStateError) as e:
            if tp not in consumer.assignment():
                log.info(
                    "intake.commit_dropped", partition=tp.partition, offset=offset, error=type(e).__name__
                )
                return
            raise
