"""CAP 1.2 in: the OASIS schema and the spec's rules, hardened parsing, and the mapping onto our
advisory — our own kk/ru/en evacuation alert, update and cancel, and documents in the style of the
specification's appendix examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import Gateway
from gateway.cap import is_cap, parse_cap
from gateway.cli import publish_raw, record_key
from gateway.errors import DecodeError, InputError, SchemaError
from gateway.lifecycle import AdvisoryState
from gateway.models import Advisory
from gateway.sandbox.process import SandboxProcess
from gateway.settings import InputLimits
from gateway.signing import SIGNATURE_HEADER, sign_document
from tests.conftest import PRIVATE_KEY, eventually, load_recipients, reached, read_topic

FIXTURES = Path(__file__).parent / "fixtures" / "cap"
LIMITS = InputLimits()
CHANNELS = ("push", "sms-http", "email")


def _cap(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _parsed(raw: bytes) -> Advisory:
    return Advisory.model_validate(parse_cap(raw, LIMITS, CHANNELS))


def test_the_kazakh_russian_english_evacuation_alert_becomes_one_advisory_with_three_languages() -> None:
    adv = _parsed(_cap("evacuation-alert.xml"))
    assert (adv.id, adv.version, adv.msg_type, adv.sender) == ("mfa.kz.evac.2026-001", 1, "alert", "mfa.test")
    assert (adv.severity, adv.urgency, adv.certainty, adv.category) == (
        "extreme",
        "immediate",
        "observed",
        "safety",
    )
    assert adv.priority == 0
    assert adv.audience.countries == ("XA",)
    assert adv.channels == CHANNELS
    assert adv.languages == ("kk", "ru", "en")
    assert adv.content["kk"].title == "Арвения: елден дереу шығыңыз"
    assert adv.content["ru"].body == (
        "Пункт пропуска «Северные ворота» открыт круглосуточно.\n\nГорячая линия: +7 7172 00 00 00"
    )
    assert adv.expires_at.isoformat() == "2036-11-26T05:00:00+00:00"
    assert adv.data["cap"]["areaDesc"] == ["Арвения"]


def test_an_update_with_prefixed_names_names_what_it_updates_and_a_cancel_needs_no_info() -> None:
    update = _parsed(_cap("evacuation-update.xml"))
    assert (update.msg_type, update.references) == ("update", ("mfa.kz.evac.2026-001",))
    cancel = _parsed(_cap("evacuation-cancel.xml"))
    assert cancel.msg_type == "cancel"
    assert cancel.references == ("mfa.kz.evac.2026-001", "mfa.kz.evac.2026-002")


def test_appendix_style_documents_are_read_and_one_without_an_expiry_is_refused_with_why() -> None:
    quake = _parsed(_cap("oasis-style-earthquake.xml"))
    assert (quake.msg_type, quake.references, quake.languages) == ("update", ("TRI13970876.1",), ("en", "es"))
    with pytest.raises(SchemaError, match=r"info.expires: required here"):
        parse_cap(_cap("oasis-style-homeland.xml"), LIMITS, CHANNELS)


def _alert(**swap: str) -> bytes:
    """The evacuation alert with text replaced: ``old=new`` pairs as keyword arguments' values."""
    text = _cap("evacuation-alert.xml").decode()
    for old_new in swap.values():
        old, new = old_new.split("=>", 1)
        assert old in text, old
        text = text.replace(old, new, 1)
    return text.encode()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE alert [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&d;</identifier></alert>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?><!DOCTYPE alert [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&x;</identifier></alert>"""


@pytest.mark.parametrize(
    ("raw", "error", "message"),
    [
        (
            _alert(a="Extreme=>Catastrophic"),
            SchemaError,
            r"not valid CAP 1.2 \(line 14\): Element 'severity': \[facet 'enumeration'\]",
        ),
        (
            _alert(a="2026-11-25T10:00:00+05:00=>2026-11-25T10:00:00"),
            SchemaError,
            r"Element 'sent': \[facet 'pattern'\]",
        ),
        (
            _alert(a="<sender>mfa.test</sender>=>"),
            SchemaError,
            r"Element 'sent': This element is not expected. Expected is \( sender \)",
        ),
        (
            _alert(a="<valueName>ISO3166-1</valueName>=><valueName>FIPS6</valueName>"),
            SchemaError,
            r"area: no ISO 3166-1 country geocode",
        ),
        (_alert(a="cap:1.2=>cap:1.1"), SchemaError, r"root element must be <alert> in namespace"),
        (EXTERNAL_ENTITY, DecodeError, r"DOCTYPE is not accepted"),
        (BILLION_LAUGHS, DecodeError, r"DOCTYPE is not accepted"),
        (b"<alert" + b" " * 300_000 + b"/>", DecodeError, r"bytes; the limit is 262144"),
        (b"<alert><unclosed></alert>", DecodeError, r"not well-formed XML"),
        (_alert(a="<status>Actual=><status>System"), SchemaError, r"status: System never reaches anyone"),
        (_alert(a="<status>Actual=><status>Draft"), SchemaError, r"status: Draft never reaches anyone"),
        (_alert(a="<msgType>Alert=><msgType>Ack"), SchemaError, r"msgType: Ack is not an advisory"),
        (_alert(a="<msgType>Alert=><msgType>Update"), SchemaError, r"references: a CAP Update must name"),
        (
            _alert(a="<scope>Public</scope>=><scope>Public</scope><references>just-an-id</references>"),
            SchemaError,
            r"references: 'just-an-id' is not sender,identifier,sent",
        ),
        (_alert(a="<language>ru-RU=><language>kk"), SchemaError, r"two <info> blocks in language 'kk'"),
        (
            _alert(a="mfa.kz.evac.2026-001=>evac@2026"),
            SchemaError,
            r"identifier: 'evac@2026' uses characters",
        ),
        (
            _alert(a="<expires>2036-11-26T10:00:00+05:00</expires>=>"),
            SchemaError,
            r"info.expires: required here",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 60 else "",
)
def test_bad_cap_is_refused_naming_what_is_wrong(raw: bytes, error: type[InputError], message: str) -> None:
    with pytest.raises(error, match=message):
        parse_cap(raw, LIMITS, CHANNELS)


@pytest.mark.parametrize("status", ["Test", "Exercise"])
def test_test_and_exercise_documents_become_training_advisories(status: str) -> None:
    record = parse_cap(_alert(a=f"<status>Actual=><status>{status}"), LIMITS, CHANNELS)
    assert record["training"] is True
    assert "training" not in parse_cap(_alert(), LIMITS, CHANNELS)


def test_a_bom_and_declared_non_utf8_encodings_are_read_as_declared() -> None:
    text = _cap("evacuation-alert.xml").decode()
    with_bom = b"\xef\xbb\xbf" + text.encode()
    utf16 = text.replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16")
    cp1251 = text.replace('encoding="UTF-8"', 'encoding="windows-1251"').replace(
        "<info>\n    <language>kk-KZ</language>", "<info>\n    <language>kk-KZ</language>", 1
    )
    russian_only = (
        cp1251[: cp1251.index("  <info>")] + cp1251[cp1251.index("  <info>\n    <language>ru-RU") :]
    )
    for raw in (with_bom, utf16, russian_only.encode("cp1251")):
        assert is_cap(raw)
        adv = _parsed(raw)
        assert adv.content["ru"].title == "Арвения: немедленно покиньте страну"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000) | st.text(max_size=500).map(lambda t: f"<alert>{t}</alert>".encode()))
def test_any_bytes_are_an_advisory_record_or_a_clean_rejection(raw: bytes) -> None:
    try:
        record: dict[str, Any] = parse_cap(raw, LIMITS, CHANNELS)
    except InputError:
        return
    assert record["id"]


async def _publish_cap(gw: Gateway, raw: bytes, signed_by: str | None = PRIVATE_KEY) -> None:
    headers = [(SIGNATURE_HEADER, sign_document(raw, signed_by).encode())] if signed_by else []
    record = parse_cap(raw, LIMITS, CHANNELS)
    await publish_raw(
        gw.bootstrap_servers, gw.settings.kafka.topic_advisories, raw, record_key(record), headers
    )


async def test_a_signed_cap_alert_update_and_cancel_go_through_the_gateway(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    """Over Kafka: the kk/ru/en alert reaches everyone in their language, its Update supersedes it,
    its Cancel withdraws both; an unsigned copy is dead-lettered."""
    await load_recipients(gateway, tmp_path, 40)
    assert gateway.store is not None
    store = gateway.store
    await _publish_cap(gateway, _cap("evacuation-alert.xml"))
    await eventually(
        lambda: reached(gateway, "mfa.kz.evac.2026-001", "delivered", 40), what="alert delivered"
    )
    stats = (await sandbox.stats())["channels"]["push"]["by_advisory"]["mfa.kz.evac.2026-001@v1"]
    assert (stats["unique_recipients"], stats["duplicates"]) == (40, 0)
    assert set(stats["languages"]) == {"kk", "ru", "en"}  # kk|ru, ru, en and de|en (→ en) chains

    await _publish_cap(gateway, _cap("evacuation-update.xml"))
    await eventually(
        lambda: reached(gateway, "mfa.kz.evac.2026-002", "delivered", 40), what="update delivered"
    )
    assert await store.advisory_state("mfa.kz.evac.2026-001", 1) is AdvisoryState.SUPERSEDED

    await _publish_cap(gateway, _cap("evacuation-cancel.xml"))

    async def both_cancelled() -> bool:
        states = [await store.advisory_state(f"mfa.kz.evac.2026-00{n}", 1) for n in (1, 2)]
        return states == [AdvisoryState.CANCELLED, AdvisoryState.CANCELLED]

    await eventually(both_cancelled, what="the CAP Cancel applied to the alert and its update")

    unsigned = _cap("evacuation-alert.xml").replace(b"2026-001", b"2026-009")
    await _publish_cap(gateway, unsigned, signed_by=None)
    (dead,) = await read_topic(gateway.bootstrap_servers, gateway.settings.kafka.topic_dlq, 1)
    headers = dict(dead.headers)
    assert headers["error"] == b"signature"
    assert b"record header 'signature'" in headers["reason"]
