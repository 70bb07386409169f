"""What every channel adapter is, and what the base does for it.

An adapter declares its limits as class attributes and writes only ``_send`` (the partner request
and the mapping of its response) and, where the partner sends receipts to a webhook,
``parse_receipts``. The base does rate limiting, timing, logging, metrics and the classification
of errors into per-message results: ``RetryableError`` → retry, ``PermanentError`` → rejected —
and keeps the provider's circuit breaker (gateway/circuit.py) from what each request showed.
Adapters know nothing of Kafka or the store; their HTTP session, clock and settings are injected.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar, cast

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from channels.pacing import Pace, Slots
from gateway import metrics
from gateway.circuit import Circuit, CircuitSettings
from gateway.errors import (
    AuthError,
    ConfigError,
    ContentError,
    PermanentError,
    RetryableError,
    SchemaError,
    ThrottledError,
)
from gateway.logging import get_logger
from gateway.models import Advisory, SegmentReceipt, Status
from gateway.rendering import unencodable
from gateway.retry import Stopped
from gateway.settings import describe_validation_error, read_secret

log = get_logger(__name__)

# where ``Adapter.report`` hands results during one ``send`` (a context variable: tasks the adapter
# starts for its messages see the send they belong to)
_ON_RESULT: contextvars.ContextVar[Callable[[Sequence[Result]], Awaitable[None]] | None] = (
    contextvars.ContextVar("on_result", default=None)
)


class ChannelSettings(BaseModel):
    """Settings every adapter has; an adapter extends this with its own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str
    enabled: bool = True  # GATEWAY__CHANNELS__<NAME>__ENABLED=false leaves a configured channel out
    rate_per_s: float = Field(1000.0, gt=0)
    burst: int = Field(500, ge=1)
    max_in_flight: int = Field(4, ge=1, le=1024)  # partner requests (batches) open at once
    timeout_s: float = Field(10.0, gt=0)
    circuit: CircuitSettings = CircuitSettings()
    # a recipient not confirmed on this channel this long after it was sent gets the next channel
    cascade_window_s: float = Field(300.0, gt=0)


class SignedChannelSettings(ChannelSettings):
    """For partners that sign with a shared secret (from the environment or a file, never YAML)."""

    secret: SecretStr | None = None
    secret_file: Path | None = None


class Message(NamedTuple):
    """One rendered message for one recipient; ``delivery_id`` is also its idempotency key.
    (Message, Result and Receipt are named tuples: a million of each are made in a broadcast, and a
    frozen dataclass costs three times as much to make.)"""

    delivery_id: str
    address: str
    parts: Mapping[str, str]
    language: str
    advisory_id: str
    version: int
    priority: int
    expires_at: datetime


class Result(NamedTuple):
    delivery_id: str
    outcome: Literal["accepted", "retry", "rejected"]
    partner_id: str | None = None
    reason: str | None = None
    retry_after: float | None = None
    costs_attempt: bool = True  # False for a retry caused by a failed circuit probe


class Receipt(NamedTuple):
    """A partner's word on one message, mapped to our status."""

    delivery_id: str
    status: Status
    partner_id: str | None = None


@dataclass(frozen=True, slots=True)
class SegmentMessage:
    """One request to a segment the partner holds, in one language: the partner fans it out to its
    users (docs/partner-push-api.md, "Segments"). ``key`` is its idempotency key."""

    key: str
    segment: str
    language: str
    languages: tuple[str, ...]  # every language this advisory version goes to the segment in
    is_default: bool  # also for the segment's users whose language is not among ``languages``
    parts: Mapping[str, str]
    advisory_id: str
    version: int
    priority: int
    expires_at: datetime
    replaces: str | None = None  # the partner's id of the earlier version's request this updates


@dataclass(frozen=True, slots=True)
class SegmentAccepted:
    partner_id: str
    targeted: int  # the users the partner will fan out to (its count; it may report more later)


class Adapter(ABC):
    name: ClassVar[str]
    kind: ClassVar[str]  # push | sms | email: chooses templates and the recipient's address
    parts: ClassVar[tuple[str, ...]]
    optional_parts: ClassVar[tuple[str, ...]] = ()
    # parts that become one header line (a subject, a title): no control characters, no line breaks
    header_parts: ClassVar[tuple[str, ...]] = ()
    limits: ClassVar[Mapping[str, int]] = {}  # part -> most characters
    max_batch: ClassVar[int] = 1
    settings_model: ClassVar[type[ChannelSettings]] = ChannelSettings
    # whether the partner takes requests for segments it holds (send_segment, cancel_segment)
    segments: ClassVar[bool] = False
    # whether the partner answers a repeated idempotency key with its first answer (HTTP partners
    # here); if not (SMTP, SMPP), dispatch claims each delivery in the store before sending it
    idempotent: ClassVar[bool] = True
    # whether the partner's receipts name only its own id for a message (an SMSC's message id), not
    # our delivery id: the store then keeps each sent message's partner id where receipts find it
    receipts_by_partner_id: ClassVar[bool] = False
    # where an adapter that receives receipts itself (SMPP deliver_sm) hands them; set by the app
    receipt_sink: Callable[[Sequence[Receipt]], Awaitable[None]] | None = None

    def __init__(
        self,
        channel: str,
        settings: ChannelSettings,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channel = channel
        self.settings = settings
        self.session = session
        self.clock = clock
        self.batch_size = min(self.max_batch, settings.burst)
        # the partner's rate and open requests, urgent batches served first (channels/pacing.py)
        self._pace = Pace(settings.rate_per_s, settings.burst)
        self._in_flight = Slots(settings.max_in_flight)
        self.circuit = Circuit(channel, settings.circuit, clock)
        self.requests_open = 0  # partner requests on their way now
        self._checked: dict[int, tuple[Mapping[str, str], str | None]] = {}  # _parts_problem's

    async def send(
        self,
        batch: Sequence[Message],
        before_request: Callable[[], Awaitable[None]] | None = None,
        on_result: Callable[[Sequence[Result]], Awaitable[None]] | None = None,
    ) -> list[Result]:
        """Send up to ``batch_size`` messages; every message gets exactly one result. At most
        ``max_in_flight`` requests are open at once, within ``rate_per_s`` / ``burst`` (an urgent
        batch waits for neither behind bulk ones: channels/pacing.py), and none while the circuit is
        open. ``before_request`` runs right before the request goes out (after every
        wait) and may raise ``Withdrawn`` to keep the batch from being sent. ``on_result`` is told of
        results as they come, where the adapter sends message by message (``report``), so that each
        is recorded before the next goes out; every result is also returned.

        A message that cannot be built (text that is not encodable, a header the partner's format
        cannot carry) is rejected alone with its reason; the rest of the batch is sent."""
        unbuildable: list[Result] = []
        sendable: list[Message] = []
        for m in batch:
            problem = self.unbuildable(m)
            if problem is None:
                sendable.append(m)
            else:
                unbuildable.append(Result(m.delivery_id, "rejected", reason=problem))
        if not sendable:
            return unbuildable
        token = _ON_RESULT.set(on_result)
        try:
            return unbuildable + await self._send_batch(sendable, before_request)
        finally:
            _ON_RESULT.reset(token)

    def unbuildable(self, m: Message) -> str | None:
        """Why this message cannot be built for the partner, or None. By default: text that is not
        encodable as UTF-8 (a lone surrogate from a ``\\ud800`` escape). Adapters add their own."""
        return unencodable((("address", m.address),)) or self._parts_problem(m.parts)

    def _parts_problem(self, parts: Mapping[str, str]) -> str | None:
        """``unencodable`` of a rendering, looked at once: the messages of one rendering share its
        parts (the renderer's cache), and a million of them checked the same text a million times.
        The rendering is held while it is remembered, so its ``id`` is never another's."""
        key = id(parts)
        known = self._checked.get(key)
        if known is None or known[0] is not parts:
            if len(self._checked) >= 256:
                self._checked.clear()
            known = self._checked[key] = (parts, unencodable(parts.items()))
        return known[1]

    async def report(self, results: Sequence[Result]) -> None:
        """Hand results to ``send``'s ``on_result`` now (before the next message goes out)."""
        on_result = _ON_RESULT.get()
        if on_result is not None and results:
            await on_result(results)

    async def _send_batch(
        self, batch: Sequence[Message], before_request: Callable[[], Awaitable[None]] | None
    ) -> list[Result]:
        probe = await self.circuit.admit()
        try:
            priority = min(m.priority for m in batch)
            async with self._in_flight.held(priority):
                waited = time.monotonic()
                await self._pace.acquire(len(batch), priority)
                metrics.rate_limit_wait_seconds_total.labels(self.channel).inc(time.monotonic() - waited)
                if before_request is not None:
                    await before_request()
                started = self.clock()
                self.requests_open += 1
                try:
                    results, healthy = await self._classified(batch)
                finally:
                    self.requests_open -= 1
                elapsed = self.clock() - started
        except BaseException:
            if probe:
                self.circuit.probe_abandoned()
            raise
        if healthy is True:
            self.circuit.success()
        elif healthy is False:
            self.circuit.failure()
            if probe:  # the circuit's cost, not the messages'
                results = [r._replace(costs_attempt=False) for r in results]
        elif probe:
            self.circuit.probe_abandoned()
        answered = {r.delivery_id for r in results}
        results += [
            Result(m.delivery_id, "retry", reason="no result from partner")
            for m in batch
            if m.delivery_id not in answered
        ]
        metrics.channel_request_seconds.labels(self.channel).observe(elapsed)
        counts: dict[str, int] = {}
        for r in results:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        for outcome, n in counts.items():
            metrics.channel_messages_total.labels(self.channel, outcome).inc(n)
        log.info(
            "channel.batch_sent",
            channel=self.channel,
            count=len(batch),
            elapsed_ms=round(elapsed * 1000, 1),
            **counts,
        )
        return results

    async def _classified(self, batch: Sequence[Message]) -> tuple[list[Result], bool | None]:
        """``_send``, with a batch-wide error turned into one result per message by its class; and
        what the request showed of the partner: up (True), down (False) or throttling us (None)."""
        try:
            results = await self._send(batch)
        except RetryableError as e:
            retry = [
                Result(m.delivery_id, "retry", reason=e.reason, retry_after=e.retry_after) for m in batch
            ]
            return retry, None if isinstance(e, ThrottledError) else False
        except PermanentError as e:
            return [Result(m.delivery_id, "rejected", reason=e.reason) for m in batch], True
        except Stopped:
            raise
        except Exception as e:  # a fault of ours, not the partner's: retried, and bounded by attempts
            log.exception("channel.adapter_error", channel=self.channel, error=type(e).__name__)
            reason = f"adapter error: {type(e).__name__}: {e}"[:300]
            return [Result(m.delivery_id, "retry", reason=reason) for m in batch], None
        if results and all(r.outcome == "retry" for r in results):
            # every message refused: the partner is down, unless it said when to come back
            return results, None if any(r.retry_after for r in results) else False
        return results, True

    @classmethod
    def unrecorded_bound(cls, settings: ChannelSettings) -> int:
        """The most messages that may have reached the partner with their results not yet recorded,
        at any instant: what a crash may send again to a partner without idempotency keys. By
        default every batch in flight (results are recorded when the whole batch is answered)."""
        return settings.max_in_flight * min(cls.max_batch, settings.burst)

    def check_rendering(self, rendered: Mapping[str, str], adv: Advisory) -> None:
        """Raise ContentError if this channel cannot carry the rendering; by default, ``limits``."""
        for part, text in rendered.items():
            limit = self.limits.get(part)
            if limit is not None and len(text) > limit:
                raise ContentError(f"{part} is {len(text)} characters; the limit is {limit}")

    @abstractmethod
    async def _send(self, batch: Sequence[Message]) -> list[Result]:
        """The partner-specific request; raise RetryableError / PermanentError for the whole batch."""

    def parse_receipts(self, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        """Verify and parse a receipt webhook call; raise AuthError if it is not the partner's."""
        raise AuthError(f"channel {self.channel!r} takes no receipt webhooks")

    async def send_segment(self, m: SegmentMessage) -> SegmentAccepted:
        """One segment request; raise RetryableError / PermanentError."""
        raise PermanentError(f"channel {self.channel!r} takes no segment requests")

    async def cancel_segment(self, partner_id: str, key: str) -> int:
        """Stop a segment's fan-out; returns how many of its users the partner will now not notify."""
        raise PermanentError(f"channel {self.channel!r} takes no segment requests")

    def parse_segment_receipts(self, body: bytes, headers: Mapping[str, str]) -> list[SegmentReceipt]:
        """Verify and parse an aggregate receipt webhook call; AuthError if it is not the partner's."""
        raise AuthError(f"channel {self.channel!r} takes no segment receipts")

    def for_receipts(self, provider: str | None) -> Adapter:
        """The adapter that parses receipts at ``/receipts/<channel>[/<provider>]``; KeyError if none."""
        if provider is not None:
            raise KeyError(provider)
        return self

    def receipts_seen(self, receipts: Sequence[Receipt]) -> None:
        """Told of every applied receipt batch (routing learns receipt latency from it)."""

    async def close(self) -> None:
        """Release partner connections the adapter opened itself."""


def expiry_times(batch: Sequence[Message]) -> dict[datetime, str]:
    """Each expiry time of a batch's messages in ISO 8601, formatted once (one advisory's, mostly:
    formatting it for every message was a cost of a million-message broadcast)."""
    return {at: at.isoformat() for at in {m.expires_at for m in batch}}


def partner_result(item: Mapping[str, Any], key: str, accepted: str, reason: str) -> Result:
    """A partner's per-message answer as a Result: ``item[key]`` names our delivery, status
    ``accepted`` (the partner's word for it) or ``rejected``; anything else is a retry."""
    delivery = str(item.get(key))
    status = item.get("status")
    if status == accepted:
        return Result(delivery, "accepted", partner_id=str(item.get("message_id")))
    if status == "rejected":
        return Result(delivery, "rejected", reason=str(item.get(reason, "rejected by partner")))
    return Result(
        delivery,
        "retry",
        reason=str(item.get(reason, "partner asked to retry")),
        retry_after=retry_after(item.get("retry_after_s")),
    )


def required_secret(key: str, value: SecretStr | None, file: Path | None) -> str:
    """A secret setting's value (from the environment or ``<key>_file``); ConfigError naming how to set it."""
    secret = read_secret(key, value.get_secret_value() if value else None, file)
    if not secret:
        variable = "GATEWAY__" + key.upper().replace(".", "__").replace("-", "_")
        raise ConfigError(f"{key}: not set; set {variable} or {key}_file")
    return secret


def retry_after(value: Any) -> float | None:
    """Seconds from a Retry-After header or field; None if absent or not a number."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


class SignedHttpAdapter(Adapter):
    """An HTTP JSON partner that signs both ways with a shared secret (docs/partner-*-api.md)."""

    settings_model = SignedChannelSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = cast(SignedChannelSettings, self.settings)
        self._secret = required_secret(f"channels.{self.channel}.secret", s.secret, s.secret_file)

    async def post_json(self, url: str, payload: Mapping[str, Any]) -> Any:
        """POST signed JSON; 429/5xx/unreachable → RetryableError, other non-200 → PermanentError."""
        body = orjson.dumps(payload)
        headers = {"Content-Type": "application/json", **hmac_headers(self._secret, body)}
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        try:
            async with self.session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                after = retry_after(resp.headers.get("Retry-After"))
                if resp.status == 429:
                    raise ThrottledError("partner answered 429", after)
                if resp.status >= 500:
                    raise RetryableError(f"partner answered {resp.status}", after)
                if resp.status != 200:
                    raise PermanentError(f"partner answered {resp.status}: {(await resp.text())[:200]}")
                try:
                    return orjson.loads(await resp.read())
                except orjson.JSONDecodeError as e:
                    raise RetryableError(f"partner answered 200 with a body that is not JSON: {e}") from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"partner unreachable: {type(e).__name__}: {e}") from e

    def verified_json(self, body: bytes, headers: Mapping[str, str], key: str) -> list[Any]:
        """The list under ``key`` of a webhook body signed by the partner; AuthError / SchemaError."""
        verify_hmac(self._secret, body, headers)
        try:  # orjson refuses nesting past 1,024 levels itself, without recursing in Python (a scan
            # of the body for its depth first cost 8 µs a receipt: 8 s of the event loop a million)
            items = orjson.loads(body)[key]
        except (ValueError, KeyError, TypeError) as e:
            raise SchemaError(f"{key}: malformed body: {e}") from e
        if not isinstance(items, list):
            raise SchemaError(f"{key}: must be a list")
        return items


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def load_settings(model: type[SettingsT], channel: str, raw: Mapping[str, Any]) -> SettingsT:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, prefix=f"channels.{channel}")) from e


# -- HMAC request signatures (shared by adapters, sandboxes and receipt webhooks) -------------

SIGNATURE_HEADER = "X-Signature"
TIMESTAMP_HEADER = "X-Timestamp"
MAX_SKEW_S = 300


def hmac_headers(secret: str, body: bytes, at: float | None = None) -> dict[str, str]:
    """Headers that sign ``body``: v1=HMAC-SHA256(secret, "<timestamp>." + body)."""
    ts = str(int(time.time() if at is None else at))
    return {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: f"v1={_mac(secret, ts, body)}"}


def _mac(secret: str, ts: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), ts.encode() + b".", hashlib.sha256)
    mac.update(body)  # not concatenated: a batch body is not copied to be signed or checked
    return mac.hexdigest()


def verify_hmac(secret: str, body: bytes, headers: Mapping[str, str], at: float | None = None) -> None:
    """Raise AuthError unless ``headers`` sign ``body`` with ``secret`` within the allowed clock skew."""
    ts = headers.get(TIMESTAMP_HEADER, "")
    given = headers.get(SIGNATURE_HEADER, "")
    if not (ts.isascii() and ts.isdigit() and given.isascii() and given.startswith("v1=")):
        raise AuthError("missing or malformed signature headers")
    if abs((time.time() if at is None else at) - int(ts)) > MAX_SKEW_S:
        raise AuthError("signature timestamp outside the allowed window")
    if not hmac.compare_digest(_mac(secret, ts, body), given[3:]):
        raise AuthError("signature does not match")
