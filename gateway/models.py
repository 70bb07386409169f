"""The advisory and recipient contracts (DESIGN.md), validated; the delivery state machine."""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway import lifecycle

_LANG = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SegmentRef(_Model):
    """An audience a partner holds (docs/partner-push-api.md, "Segments"): the partner fans out."""

    channel: str = Field(min_length=1, max_length=32, pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    segment: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9:._\-]*$")


class Audience(_Model):
    countries: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    segments: tuple[SegmentRef, ...] = ()

    @property
    def in_directory(self) -> bool:
        """Whether the audience names anyone in our own directory (else only partner segments)."""
        return bool(self.countries or self.regions or self.tags)

    @field_validator("segments")
    @classmethod
    def _unique_segments(cls, v: tuple[SegmentRef, ...]) -> tuple[SegmentRef, ...]:
        seen = {(s.channel, s.segment) for s in v}
        if len(seen) != len(v):
            raise ValueError("a segment may appear only once per channel")
        return v

    @field_validator("countries")
    @classmethod
    def _country_codes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for code in v:
            if len(code) != 2 or not code.isalpha():
                raise ValueError(f"{code!r} is not an ISO 3166 alpha-2 country code")
        return tuple(c.upper() for c in v)

    @model_validator(mode="after")
    def _not_empty(self) -> Audience:
        if not (self.countries or self.regions or self.tags or self.segments):
            raise ValueError("name at least one of countries, regions, tags or segments")
        return self


class Content(_Model):
    """Inline text for one language; used for every channel (title is also the e-mail subject)."""

    title: str = Field(min_length=1, max_length=200)
    body: str = Field(min_length=1, max_length=4000)


URGENT, BULK = 0, 1  # Advisory.priority: urgent work goes first in the planner and in every lane


class Advisory(_Model):
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")
    version: int = Field(1, ge=1)
    msg_type: Literal["alert", "update", "cancel"] = "alert"
    sender: str = Field(min_length=1, max_length=200)
    issued_at: datetime
    expires_at: datetime
    severity: Literal["extreme", "severe", "moderate", "minor", "unknown"] = "unknown"
    urgency: Literal["immediate", "expected", "future", "past", "unknown"] = "unknown"
    certainty: Literal["observed", "likely", "possible", "unlikely", "unknown"] = "unknown"
    category: str = "safety"
    audience: Audience
    channels: tuple[str, ...] = Field(min_length=1)
    languages: tuple[str, ...] = ()
    template: str | None = Field(None, pattern=r"^[a-z0-9_\-]+$")
    data: dict[str, Any] = Field(default_factory=dict)
    content: dict[str, Content] = Field(default_factory=dict)
    references: tuple[str, ...] = ()
    max_sms_parts: int | None = Field(None, ge=1, le=20)
    # a rehearsal: sent only to the gateway's own sandbox partners, never to the public
    training: bool = False
    signature: str | None = None

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("must include a timezone (e.g. 2026-11-25T10:00:00Z)")
        return v.astimezone(UTC)

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("a channel may appear only once in the cascade")
        return v

    @field_validator("languages")
    @classmethod
    def _langs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(lang.lower() for lang in v)

    @model_validator(mode="after")
    def _content_source(self) -> Advisory:
        if self.msg_type == "cancel":
            if not self.references:
                raise ValueError("a cancel must name the advisory it cancels in references")
            return self
        if (self.template is None) == (not self.content):
            raise ValueError("give either template (with data) or inline content, not both or neither")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self

    @property
    def key(self) -> str:
        return lifecycle.key(self.id, self.version)

    @property
    def priority(self) -> int:
        """URGENT (0) for life-safety (overtakes), BULK (1) for the rest."""
        return URGENT if self.urgency == "immediate" or self.severity == "extreme" else BULK


class Recipient(_Model):
    id: str = Field(min_length=1, max_length=128)
    languages: tuple[str, ...] = ()
    phone: str | None = None
    email: str | None = Field(None, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    app_user: str | None = Field(None, max_length=256)
    country: str | None = Field(None, min_length=2, max_length=2)
    region: str | None = None
    tags: tuple[str, ...] = ()
    opt_outs: tuple[str, ...] = ()

    @field_validator("languages", "tags", "opt_outs", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        """CSV cells hold lists as 'kk|ru'."""
        if isinstance(v, str):
            return tuple(p.strip() for p in v.split("|") if p.strip())
        return v

    @field_validator("languages")
    @classmethod
    def _lower_langs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(x.lower() for x in v)

    @field_validator("tags")
    @classmethod
    def _tag_chars(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for tag in v:
            if "," in tag:
                raise ValueError(f"tag {tag!r} may not contain a comma")
        return v

    @field_validator("country")
    @classmethod
    def _upper_country(cls, v: str | None) -> str | None:
        return v.upper() if v else v

    @field_validator("phone")
    @classmethod
    def _e164(cls, v: str | None) -> str | None:
        """Valid numbers are stored in E.164; an invalid one is kept as given (see ``phone_problem``):
        the recipient stays reachable on other channels, and their SMS is skipped with the reason."""
        if not v:
            return None
        return e164(v) or v.strip()

    @functools.cached_property
    def phone_problem(self) -> str | None:
        """Why ``phone`` cannot take an SMS, or None (worked out once: an import asks twice)."""
        return phone_problem(self.phone)

    @field_validator("email", "app_user", "region", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    def address(self, channel: str) -> str | None:
        """The recipient's address on a channel kind, or None."""
        return address_on(channel, self.app_user, self.phone, self.email)


class Reachable(Protocol):
    """What choosing a recipient's channel and language reads: a ``Recipient``, or a ``Contact``."""

    @property
    def id(self) -> str: ...
    @property
    def languages(self) -> tuple[str, ...]: ...
    @property
    def opt_outs(self) -> tuple[str, ...]: ...
    @property
    def phone_problem(self) -> str | None: ...
    def address(self, channel: str) -> str | None: ...


class Contact(NamedTuple):
    """A stored recipient as a broadcast reads it, a million at a time: the row as stored, its lists
    in their stored text, built without validating it again (it was validated when it was stored;
    ``Recipient`` is the validated model, and ``recipient()`` gives one back)."""

    id: str
    stored_languages: str  # "kk|ru"
    phone: str | None
    email: str | None
    app_user: str | None
    country: str | None
    region: str | None
    stored_tags: str  # ",staff,registered,"
    stored_opt_outs: str  # "sms|email"
    # the number's check when it was stored (gateway/schema.py); None: not known, checked here
    phone_valid: bool | None = None

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(x for x in self.stored_languages.split("|") if x) if self.stored_languages else ()

    @property
    def opt_outs(self) -> tuple[str, ...]:
        return tuple(x for x in self.stored_opt_outs.split("|") if x) if self.stored_opt_outs else ()

    @property
    def phone_problem(self) -> str | None:
        """As ``phone_problem``, from the check made when the number was stored: parsing it again
        was a sixth of the event loop's work when a broadcast went by SMS."""
        if self.phone is None or self.phone_valid is None:
            return phone_problem(self.phone)
        return None if self.phone_valid else INVALID_PHONE

    def address(self, channel: str) -> str | None:
        return address_on(channel, self.app_user, self.phone, self.email)

    def recipient(self) -> Recipient:
        """The same recipient as the model (for a template that reads the recipient)."""
        return Recipient.model_construct(
            id=self.id,
            languages=self.languages,
            phone=self.phone,
            email=self.email,
            app_user=self.app_user,
            country=self.country,
            region=self.region,
            tags=tuple(x for x in self.stored_tags.split(",") if x),
            opt_outs=self.opt_outs,
        )


def address_on(channel: str, app_user: str | None, phone: str | None, email: str | None) -> str | None:
    """A recipient's address on a channel's kind (push: the super-app user, sms: the phone, email:
    the e-mail address), or None."""
    kind = channel_kind(channel)
    return app_user if kind == "push" else phone if kind == "sms" else email if kind == "email" else None


def phone_problem(phone: str | None) -> str | None:
    """Why ``phone`` cannot take an SMS, or None. It names no number: it is stored as a skipped
    delivery's reason, which the delivery events and the status API carry (the recipient's row says
    which number; ``report`` shows it to those who may see it)."""
    if phone is None or e164(phone) == phone:
        return None
    return INVALID_PHONE


INVALID_PHONE = "invalid phone number: not a valid international (E.164) number"


def e164(raw: str) -> str | None:
    """``raw`` as E.164 if it is a valid international number, else None."""
    try:
        number = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def channel_kind(channel: str) -> str:
    """'sms-http' and 'smpp' are SMS; channel names are otherwise their kind."""
    if channel in {"smpp"} or channel.startswith("sms"):
        return "sms"
    return channel.split("-", 1)[0]


class Status(enum.StrEnum):
    PLANNED = "planned"
    QUEUED = "queued"
    SENT = "sent"
    UNKNOWN = "unknown"  # sent, but no receipt within the receipt window (a late receipt still counts)
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def final(self) -> bool:
        return self in FINAL

    @property
    def rank(self) -> int:
        """Progress order; a status never moves to a lower rank (late receipts are harmless)."""
        return _RANK[self]


FINAL = frozenset(
    {
        Status.DELIVERED,
        Status.READ,
        Status.FAILED,
        Status.EXPIRED,
        Status.CANCELLED,
        Status.SKIPPED,
        Status.UNKNOWN,
    }
)
PENDING = frozenset({Status.PLANNED, Status.QUEUED})
_RANK = {
    Status.PLANNED: 0,
    Status.QUEUED: 1,
    Status.SENT: 2,
    Status.UNKNOWN: 3,
    Status.FAILED: 4,
    Status.DELIVERED: 5,
    Status.READ: 6,
    Status.EXPIRED: 7,
    Status.CANCELLED: 7,
    Status.SKIPPED: 7,
}


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message of the ``deliveries`` topic: delivery ids of one advisory version on one channel."""

    advisory_id: str
    version: int
    channel: str
    ids: tuple[str, ...]

    def encode(self) -> bytes:
        return json.dumps(
            {
                "advisory_id": self.advisory_id,
                "version": self.version,
                "channel": self.channel,
                "ids": list(self.ids),
            }
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Chunk:
        d = json.loads(raw)
        return cls(str(d["advisory_id"]), int(d["version"]), str(d["channel"]), tuple(d["ids"]))


# what a partner reports of a segment request: cumulative counts of its users
SEGMENT_COUNTS = ("targeted", "delivered", "read", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class SegmentReceipt:
    """A partner's aggregate receipt for one segment request: its counts so far (SEGMENT_COUNTS)."""

    key: str  # our segment delivery id: the request's idempotency key
    counts: Mapping[str, int]
    final: bool  # the partner's fan-out is over: the counts will not change


def segment_delivery_id(advisory_id: str, version: int, channel: str, segment: str, language: str) -> str:
    """Deterministic id of one segment request, also its idempotency key: (advisory, version,
    segment, language) on a channel is one request, ever."""
    return _digest(advisory_id, version, f"\x1esegment\x1e{segment}\x1e{language}", channel)[:32]


def delivery_hash(advisory_id: str, version: int, recipient_id: str, channel: str) -> str:
    """What a delivery is — its advisory version, recipient and channel — hashed: the part of its id
    after its number (``delivery_id``)."""
    return _digest(advisory_id, version, recipient_id, channel)[:20]


def delivery_id(seq: int, hashed: str) -> str:
    """A delivery's id, also its idempotency key: its number in the order deliveries are made (12 hex
    digits, so ids sort as they are made and every index of them grows at its end), then its
    ``delivery_hash`` (no two deliveries anywhere share an id). Made once, by the store; a replay
    finds the delivery made before and its id, never a new one."""
    return f"{seq:012x}{hashed}"


def _digest(advisory_id: str, version: int, recipient_id: str, channel: str) -> str:
    raw = f"{advisory_id}\x1f{version}\x1f{recipient_id}\x1f{channel}".encode()
    return hashlib.sha256(raw).hexdigest()


def now() -> datetime:
    return datetime.now(UTC)


def instance_name() -> str:
    """This process as named on what it holds in a shared store (planning leases, delivery claims):
    host, pid and a random tag, so a restarted process is never taken for its predecessor."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def aware(at: datetime) -> datetime:
    """A stored time as UTC-aware (SQLite gives it back naive)."""
    return at if at.tzinfo else at.replace(tzinfo=UTC)
