"""A corpus of bad advisory records, each with the dead-letter kind it must get.

Every class of input that once stalled intake or could flood a citizen: deep nesting, binary,
numbers and strings past the limits, wrong types, a template filter given the wrong type, a header
with a line break, text that is not encodable, forged and unsigned records, CAP-like XML bombs, and
cancels or updates of another sender's advisory. ``drill poison`` puts them on the topic before a
good advisory; the intake tests take each one through ``Intake.validate`` / the store. CAP documents
travel without the record header ``signature``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]
Signer = Callable[[Record], Record]

XML_BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&lol3;</identifier></alert>"""
XXE = b"""<?xml version="1.0"?><!DOCTYPE alert [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&x;</identifier></alert>"""


def cap_alert(identifier: str, sender: str, severity: str = "Extreme") -> bytes:
    """A small CAP 1.2 alert (English, country XA) for the corpus."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>{identifier}</identifier>
<sender>{sender}</sender><sent>2026-11-25T10:00:00+00:00</sent><status>Actual</status>
<msgType>Alert</msgType><scope>Public</scope><info><category>Safety</category><event>Evacuation</event>
<urgency>Immediate</urgency><severity>{severity}</severity><certainty>Observed</certainty>
<expires>2036-11-25T10:00:00+00:00</expires><headline>Leave now</headline><description>Go north.</description>
<area><areaDesc>Arvenia</areaDesc><geocode><valueName>ISO3166-1</valueName><value>XA</value></geocode></area>
</info></alert>""".encode()


@dataclass(frozen=True, slots=True)
class Poison:
    name: str
    expected: str  # InputError.kind it must be dead-lettered with
    raw: bytes
    # published once the good advisory is stored (a cross-sender cancel or update must find it)
    after_good: bool = False


def _bytes(record: Record) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode()


def corpus(good: Record, sign: Signer, forge: Signer, rogue: Signer) -> list[Poison]:
    """Bad records made from ``good`` (an unsigned, valid advisory): ``sign`` signs as its sender,
    ``forge`` signs with a key nobody trusts, ``rogue`` makes the record another trusted sender's
    (its ``sender`` and signature)."""

    def variant(**over: Any) -> Record:
        return {**good, "id": f"poison-{uuid.uuid4().hex[:8]}", **over}

    def data(**over: Any) -> Record:
        return {**good["data"], **over}

    inline_title = {"en": {"title": "Leave\nnow", "body": "Cross at North Gate."}}
    surrogate = {"en": {"title": "Leave \ud800 now", "body": "Cross at North Gate."}}
    return [
        Poison("deep_list_nesting", "decode", b"[" * 100_000),
        Poison("deep_object_nesting", "decode", b'{"a":' * 20_000 + b"1" + b"}" * 20_000),
        Poison("binary", "decode", bytes(range(256)) * 8),
        Poison("not_utf8", "decode", b'{"id": "\xff\xfe", "version": 1}'),
        Poison("empty", "decode", b""),
        Poison("oversized", "decode", _bytes(variant(data=data(hotline="9" * 400_000)))),
        Poison("number_of_5000_digits", "decode", b'{"version": ' + b"9" * 5000 + b"}"),
        Poison("json_array", "decode", b"[1, 2, 3]"),
        Poison("xml_bomb", "decode", XML_BOMB),
        Poison("xml_external_entity", "decode", XXE),
        Poison(
            "cap_bad_enumeration",
            "schema",
            cap_alert(f"poison-{uuid.uuid4().hex[:8]}", good["sender"], "Dire"),
        ),
        Poison("cap_unsigned", "signature", cap_alert(f"poison-{uuid.uuid4().hex[:8]}", good["sender"])),
        Poison("long_string", "schema", _bytes(sign(variant(data=data(hotline="7" * 20_000))))),
        Poison("long_list", "schema", _bytes(sign(variant(data=data(open_crossings=[{}] * 5000))))),
        Poison("wrong_types", "schema", _bytes(sign(variant(version="one", channels="push")))),
        Poison("version_out_of_range", "schema", _bytes(sign(variant(version=10**12)))),
        Poison("too_many_channels", "schema", _bytes(sign(variant(channels=[f"c{i}" for i in range(50)])))),
        Poison("unsigned", "signature", _bytes(variant())),
        Poison("forged", "signature", _bytes(forge(variant()))),
        Poison("altered_after_signing", "signature", _bytes({**sign(variant()), "category": "altered"})),
        Poison("template_type_error", "content", _bytes(sign(variant(data=data(open_crossings=5))))),
        Poison("template_missing_value", "content", _bytes(sign(variant(data={})))),
        Poison(
            "header_line_break",
            "content",
            _bytes(sign(variant(template=None, data={}, content=inline_title))),
        ),
        # a "\ud800" escape decodes to a string no UTF-8 encoder takes (the model refuses it)
        Poison(
            "lone_surrogate",
            "schema",
            json.dumps({**sign(variant()), "content": surrogate, "template": None}).encode(),
        ),
        Poison(
            "cross_sender_cancel",
            "authority",
            _bytes(rogue(variant(msg_type="cancel", references=[good["id"]]))),
            after_good=True,
        ),
        Poison(
            "cross_sender_update",
            "authority",
            _bytes(rogue({**good, "version": int(good.get("version", 1)) + 1})),
            after_good=True,
        ),
    ]
