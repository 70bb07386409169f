"""CAP out and the Atom index: every export is valid against the OASIS CAP 1.2 schema and reads back
as the same advisory; the feed shows each published advisory once, in its newest version, with a
CAP link, and drops what is superseded, cancelled or expired."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
from lxml import etree

from gateway.app import Gateway
from gateway.cap import parse_cap, to_cap, validate_cap
from gateway.feed import Feed
from gateway.models import Advisory, now
from gateway.rendering import Renderer
from gateway.settings import InputLimits, load_settings
from tests.conftest import advisory

CAP_FIXTURES = Path(__file__).parent / "fixtures" / "cap"
ATOM = "{http://www.w3.org/2005/Atom}"
CHANNELS = ("push", "sms-http", "email")


def _renderer() -> Renderer:
    return Renderer(load_settings(environ={}).rendering.templates_path(), "en")


def test_a_template_advisory_exports_as_valid_cap_with_one_info_per_language_and_reads_back() -> None:
    adv = Advisory.model_validate(advisory(languages=["kk", "ru"]))
    feed = Feed(None, _renderer(), None)  # type: ignore[arg-type] - texts() needs no store
    raw = to_cap(adv, feed.texts(adv))
    validate_cap(raw)
    back = Advisory.model_validate(parse_cap(raw, InputLimits(), CHANNELS))
    assert back.id == adv.id
    assert back.languages == ("kk", "ru", "en")
    assert (back.severity, back.urgency, back.certainty) == (adv.severity, adv.urgency, adv.certainty)
    assert back.audience.countries == adv.audience.countries
    assert back.expires_at == adv.expires_at.replace(microsecond=0)
    assert "Арвения" in back.content["kk"].title + back.content["kk"].body


async def _accept(gw: Gateway, name: str, sent_now: bool = False) -> Advisory:
    """Store a CAP fixture as intake would; ``sent_now``: as sent this moment (a cancel stands for a
    day after it was sent, and the fixture's date is in the past)."""
    assert gw.store is not None
    document = (CAP_FIXTURES / name).read_bytes()
    if sent_now:
        at = now().replace(microsecond=0).isoformat().encode()
        document = re.sub(rb"<sent>[^<]*</sent>", b"<sent>" + at + b"</sent>", document, count=1)
    adv = Advisory.model_validate(parse_cap(document, InputLimits(), CHANNELS))
    await gw.store.accept(adv, adv.model_dump(mode="json"), {})
    return adv


async def _entries(http: aiohttp.ClientSession) -> list[tuple[str, str]]:
    async with http.get("/feed.atom") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/atom+xml"
        root = etree.fromstring(await resp.read())
    out = []
    for entry in root.findall(f"{ATOM}entry"):
        link = entry.find(f"{ATOM}link")
        assert link is not None
        assert link.get("type") == "application/cap+xml"
        out.append((str(entry.findtext(f"{ATOM}id")), str(link.get("href"))))
    return out


async def test_the_feed_follows_an_alert_through_its_update_and_cancel(gateway: Gateway) -> None:
    async with aiohttp.ClientSession(gateway.public_url) as http:
        assert await _entries(http) == []
        await _accept(gateway, "evacuation-alert.xml")
        [(entry_id, href)] = await _entries(http)
        assert entry_id == "urn:broadcast-gateway:advisory:mfa.kz.evac.2026-001"
        async with http.get(href.replace(gateway.public_url, "")) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/cap+xml"
            document = await resp.read()
        validate_cap(document)
        exported = Advisory.model_validate(parse_cap(document, InputLimits(), CHANNELS))
        assert exported.languages == ("kk", "ru", "en")
        assert exported.content["ru"].title == "Арвения: немедленно покиньте страну"

        await _accept(gateway, "evacuation-update.xml")  # supersedes 001: it leaves the feed
        assert [e for e, _ in await _entries(http)] == ["urn:broadcast-gateway:advisory:mfa.kz.evac.2026-002"]
        async with http.get("/cap/mfa.kz.evac.2026-002") as resp:
            update = await resp.read()
        validate_cap(update)
        # the same instant as the alert's <sent>, in UTC as stored
        assert b"<references>mfa.test,mfa.kz.evac.2026-001,2026-11-25T05:00:00+00:00</references>" in update

        await _accept(gateway, "evacuation-cancel.xml", sent_now=True)  # withdraws both; the cancel is shown
        assert [e for e, _ in await _entries(http)] == ["urn:broadcast-gateway:advisory:mfa.kz.evac.2026-003"]
        async with http.get("/cap/mfa.kz.evac.2026-003") as resp:
            cancel = await resp.read()
        validate_cap(cancel)
        assert parse_cap(cancel, InputLimits(), CHANNELS)["msg_type"] == "cancel"
        async with http.get("/cap/mfa.kz.evac.2026-001") as resp:
            assert resp.status == 404
            assert (await resp.json(content_type="application/problem+json"))["field"] == "advisory_id"


@pytest.mark.parametrize(
    "name", ["evacuation-alert.xml", "evacuation-update.xml", "oasis-style-earthquake.xml"]
)
def test_what_comes_in_as_cap_goes_out_as_valid_cap(name: str) -> None:
    record = parse_cap((CAP_FIXTURES / name).read_bytes(), InputLimits(), CHANNELS)
    adv = Advisory.model_validate(record)
    named = [(adv.sender, ref, adv.issued_at) for ref in adv.references]
    raw = to_cap(adv, Feed(None, _renderer(), None).texts(adv), named)  # type: ignore[arg-type]
    validate_cap(raw)
    again = parse_cap(raw, InputLimits(), CHANNELS)
    for key in ("id", "msg_type", "references", "languages", "content", "audience"):
        assert again[key] == record[key], key
