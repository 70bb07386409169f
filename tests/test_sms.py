"""SMS encoding and part counts, checked against an independent GSM 03.38 codec (gsm0338)."""

from __future__ import annotations

import math

import gsm0338  # noqa: F401 - registers the "gsm03.38" codec
import pytest

from channels.sms import encode, layout, udh_segments

TABLE = [
    ("English", "Leave now via North Gate. Hotline +7 7172 000000."),
    ("GSM extension characters", "Crossings [A] & {B} ~ open | fee 10€ ^ \\ path"),
    ("Russian", "Покиньте страну через пункт пропуска «Северные ворота»."),
    ("Kazakh", "Елден шығыңыз: өткізу пункті ашық, қоңырау шалыңыз, ұшақ жоқ, үй, һ, і, ә, ғ, ң."),
    ("emoji", "Leave now ⚠️ 🚨 go north"),
    ("accented GSM", "Café è à ù ñ Ä Ö Ü ß Ø Å"),
    ("empty", ""),
]


def _reference(text: str) -> tuple[str, int]:
    """(encoding, units) by the reference codec: GSM-7 if it can encode it, else UTF-16 units."""
    try:
        return "gsm7", len(text.encode("gsm03.38"))
    except UnicodeEncodeError:
        return "ucs2", len(text.encode("utf-16-be")) // 2


def _reference_parts(encoding: str, units: int) -> int:
    single, multi = (160, 153) if encoding == "gsm7" else (70, 67)
    return 0 if units == 0 else 1 if units <= single else math.ceil(units / multi)


@pytest.mark.parametrize(("name", "text"), TABLE, ids=[n for n, _ in TABLE])
@pytest.mark.parametrize("repeat", [1, 3, 9])
def test_encoding_and_size_match_the_reference(name: str, text: str, repeat: int) -> None:
    message = text * repeat
    got = layout(message)
    encoding, units = _reference(message)
    assert (got.encoding, got.units) == (encoding, units)
    assert "".join(got.parts) == message, "nothing replaced, nothing lost"
    # parts never split an escape pair or a surrogate pair, so they may be one more than the plain count
    assert len(got.parts) in {_reference_parts(encoding, units), _reference_parts(encoding, units) + 1}
    if encoding == "gsm7":
        assert encode(message, "gsm7") == message.encode("gsm03.38")


@pytest.mark.parametrize("letter", list("әғқңөұүһі"))
def test_each_kazakh_letter_forces_ucs2(letter: str) -> None:
    assert layout(f"Leave now {letter}").encoding == "ucs2"


def test_boundaries_160_153_70_67() -> None:
    assert len(layout("a" * 160).parts) == 1
    assert [len(p) for p in layout("a" * 161).parts] == [153, 8]
    assert len(layout("ж" * 70).parts) == 1
    assert [len(p) for p in layout("ж" * 71).parts] == [67, 4]
    # an extension character counts 2: 159 letters + € = 161 septets → two parts
    assert len(layout("a" * 159 + "€").parts) == 2


def test_a_part_never_splits_an_escape_or_a_surrogate_pair() -> None:
    gsm = layout("a" * 152 + "€" + "b" * 10)  # € would straddle septets 153/154
    assert gsm.parts[0] == "a" * 152
    assert gsm.parts[1].startswith("€")
    ucs = layout("ж" * 66 + "🚨" + "ж" * 10)  # the emoji would straddle units 67/68
    assert ucs.parts[0] == "ж" * 66
    assert ucs.parts[1].startswith("🚨")
    assert all(len(p.encode("utf-16-be")) // 2 <= 67 for p in ucs.parts)


def _reassemble(encoding: str, segments: list[bytes]) -> str:
    """What a handset does: order by the UDH sequence number, strip headers, decode (independently)."""
    if len(segments) == 1:
        raw = segments[0]
        return raw.decode("gsm03.38") if encoding == "gsm7" else raw.decode("utf-16-be")
    headers = [s[:6] for s in segments]
    assert {h[:3] for h in headers} == {b"\x05\x00\x03"}
    assert {h[3] for h in headers} == {headers[0][3]}, "one reference for all parts"
    assert [h[4] for h in headers] == [len(segments)] * len(segments)
    ordered = sorted(segments, key=lambda s: s[5])
    body = b"".join(s[6:] for s in ordered)
    return body.decode("gsm03.38") if encoding == "gsm7" else body.decode("utf-16-be")


def test_a_long_kazakh_message_splits_into_udh_parts_that_reassemble_to_the_original() -> None:
    text = " ".join(dict(TABLE)["Kazakh"] for _ in range(4)) + " 🚨"
    encoding, segments = udh_segments(text, reference=300)
    assert encoding == "ucs2"
    assert len(segments) == len(layout(text).parts) > 1
    assert all(len(s) <= 6 + 67 * 2 for s in segments), "67 UTF-16 units after the header"
    assert {s[3] for s in segments} == {300 % 256}
    assert _reassemble(encoding, list(reversed(segments))) == text


def test_a_long_gsm7_message_with_extension_characters_reassembles() -> None:
    text = "Route [A] {north} ~ 10€ | " * 12
    encoding, segments = udh_segments(text, reference=7)
    assert encoding == "gsm7"
    assert all(len(s) <= 6 + 153 for s in segments)
    assert _reassemble(encoding, segments) == text


def test_a_short_message_has_no_udh() -> None:
    encoding, segments = udh_segments("Leave now", reference=1)
    assert (encoding, segments) == ("gsm7", [b"Leave now"])
