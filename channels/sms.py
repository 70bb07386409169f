"""SMS encoding: GSM 03.38 (7-bit) when every character is in it, UCS-2 otherwise — never a
character replaced. Kazakh letters (ә ғ қ ң ө ұ ү һ і) and Cyrillic force UCS-2.

Sizes: GSM-7 160 septets in one part, 153 per part when concatenated (extension characters
``^{}\\[~]|€`` and form feed count 2 and are never split from their escape); UCS-2 70 UTF-16 units,
67 per part (a surrogate pair — an emoji — is never split).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, cast

from pydantic import Field

from channels.base import Adapter, ChannelSettings, SignedChannelSettings
from gateway.errors import ContentError
from gateway.models import Advisory, Status

# GSM 03.38 default alphabet, in code order (0x00-0x7F); 0x1B is the escape to the extension table.
GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# extension table: character -> code after the escape
GSM7_EXTENSION = {
    "\f": 0x0A,
    "^": 0x14,
    "{": 0x28,
    "}": 0x29,
    "\\": 0x2F,
    "[": 0x3C,
    "~": 0x3D,
    "]": 0x3E,
    "|": 0x40,
    "€": 0x65,
}
_BASIC_CODE = {c: i for i, c in enumerate(GSM7_BASIC) if c != "\x1b"}

SINGLE = {"gsm7": 160, "ucs2": 70}
CONCATENATED = {"gsm7": 153, "ucs2": 67}
DATA_CODING = {"gsm7": 0x00, "ucs2": 0x08}

Encoding = Literal["gsm7", "ucs2"]


def is_gsm7(text: str) -> bool:
    return all(c in _BASIC_CODE or c in GSM7_EXTENSION for c in text)


def _units(ch: str, encoding: Encoding) -> int:
    if encoding == "gsm7":
        return 2 if ch in GSM7_EXTENSION else 1
    return 2 if ord(ch) > 0xFFFF else 1  # UTF-16 surrogate pair


@dataclass(frozen=True, slots=True)
class SmsLayout:
    encoding: Encoding
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    parts: tuple[str, ...]

    @property
    def data_coding(self) -> int:
        return DATA_CODING[self.encoding]


@functools.lru_cache(maxsize=1024)
def layout(text: str) -> SmsLayout:
    """How ``text`` goes out as SMS: encoding, size, and the text of each part. Remembered for the
    texts seen last: the messages of one rendering share their text (a third of the event loop's
    time in an SMS broadcast went to laying out the same text again for every recipient)."""
    encoding: Encoding = "gsm7" if is_gsm7(text) else "ucs2"
    units = sum(_units(c, encoding) for c in text)
    if units <= SINGLE[encoding]:
        return SmsLayout(encoding, units, (text,) if text else ())
    limit = CONCATENATED[encoding]
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for ch in text:
        size = _units(ch, encoding)
        if used + size > limit:
            parts.append("".join(current))
            current, used = [], 0
        current.append(ch)
        used += size
    if current:
        parts.append("".join(current))
    return SmsLayout(encoding, units, tuple(parts))


def encode_gsm7(text: str) -> bytes:
    """Unpacked GSM 03.38 (one septet per byte, as SMPP's default alphabet carries it)."""
    out = bytearray()
    for ch in text:
        if ch in GSM7_EXTENSION:
            out += bytes((0x1B, GSM7_EXTENSION[ch]))
        else:
            out.append(_BASIC_CODE[ch])
    return bytes(out)


def encode(text: str, encoding: Encoding) -> bytes:
    return encode_gsm7(text) if encoding == "gsm7" else text.encode("utf-16-be")


def udh_segments(text: str, reference: int) -> tuple[Encoding, list[bytes]]:
    """The short_message payloads of a concatenated SMS (esm_class UDHI): each part prefixed with
    the 8-bit-reference concatenation header ``05 00 03 <ref> <total> <seq>``. One part: no header."""
    sms = layout(text)
    if len(sms.parts) <= 1:
        return sms.encoding, [encode(text, sms.encoding)]
    if len(sms.parts) > 255:
        raise ValueError("a concatenated SMS has at most 255 parts")
    ref = reference % 256
    total = len(sms.parts)
    return sms.encoding, [
        bytes((0x05, 0x00, 0x03, ref, total, seq)) + encode(part, sms.encoding)
        for seq, part in enumerate(sms.parts, start=1)
    ]


# -- what every SMS adapter shares ------------------------------------------------------------

# SMPP / aggregator delivery-receipt states (the "stat:" of a DLR) -> our status; None: not final yet
DLR_STATUS: dict[str, Status | None] = {
    "DELIVRD": Status.DELIVERED,
    "UNDELIV": Status.FAILED,
    "EXPIRED": Status.FAILED,
    "REJECTD": Status.FAILED,
    "DELETED": Status.FAILED,
    "UNKNOWN": None,
    "ACCEPTD": None,
    "ENROUTE": None,
}


class SmsSettings(SignedChannelSettings):
    sender: str = Field("MFA", min_length=1, max_length=11)
    max_parts: int = Field(6, ge=1, le=255)  # an advisory may lower it (max_sms_parts), never raise it


class SmsAdapter(Adapter):
    """Base of SMS adapters: one ``body`` part, checked for its size in parts, never re-encoded."""

    kind = "sms"
    parts = ("body",)
    settings_model: ClassVar[type[ChannelSettings]] = SmsSettings

    @property
    def sms_settings(self) -> SmsSettings:
        return cast(SmsSettings, self.settings)

    def max_parts(self, adv: Advisory) -> int:
        limit = self.sms_settings.max_parts
        return min(limit, adv.max_sms_parts) if adv.max_sms_parts else limit

    def check_rendering(self, rendered: Mapping[str, str], adv: Advisory) -> None:
        sms = layout(rendered["body"])
        if len(sms.parts) > self.max_parts(adv):
            raise ContentError(
                f"body needs {len(sms.parts)} SMS parts ({sms.encoding.upper()}, {sms.units} units); "
                f"the limit is {self.max_parts(adv)}"
            )
