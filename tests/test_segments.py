"""Partner-side segments (gateway/segments.py, docs/partner-push-api.md "Segments"): an audience the
super-app holds is reached with one request per language, the partner's aggregate receipts come back
and are shown by the status API and /metrics; a cancel and an update reach the partner; a crash
between the partner's answer and the store never starts a second fan-out; intake refuses a segment
on a channel whose partner takes none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from gateway.app import Gateway, build_adapters
from gateway.cli import publish
from gateway.models import SEGMENT_COUNTS, Advisory
from gateway.progress import segments_table
from gateway.rendering import Renderer
from gateway.sandbox.process import SandboxProcess
from gateway.schema import segment_deliveries
from gateway.segments import SegmentSender, segment_rows
from gateway.settings import Settings
from gateway.store import SegmentDelivery, Store
from tests.conftest import (
    advisory,
    bearer,
    eventually,
    load_recipients,
    reached,
    read_topic,
    running_gateway,
    signed,
)

SIZE = 10_000
SHARES = {"kk": 0.45, "ru": 0.40, "en": 0.15}  # the sandbox's default spread of its users' languages
GEO = {"channel": "push", "segment": "geo:XA"}


async def _segments(gw: Gateway, advisory_id: str) -> list[SegmentDelivery]:
    assert gw.store is not None
    return await gw.store.segments(advisory_id)


async def _partner(sandbox: SandboxProcess) -> dict[str, Any]:
    push: dict[str, Any] = (await sandbox.stats())["channels"]["push"]
    return push


async def test_a_segment_is_one_request_per_language_and_the_partners_counts_come_back(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    await sandbox.configure("push", segment_size=SIZE)
    await load_recipients(gateway, tmp_path, 20)
    record = signed(advisory(audience={"countries": ["XA"], "segments": [GEO]}))
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)

    async def all_final() -> bool:
        segs = await _segments(gateway, record["id"])
        return len(segs) == 3 and all(s.final for s in segs)

    await eventually(all_final, what="three segment requests, their fan-outs over")
    await eventually(lambda: reached(gateway, record["id"], "delivered", 20), what="the directory's 20")

    segs = {s.language: s for s in await _segments(gateway, record["id"])}
    assert sorted(segs) == ["en", "kk", "ru"]  # every language the template has, one request each
    assert [lang for lang, s in segs.items() if s.is_default] == ["en"]  # the configured default
    for lang, s in segs.items():
        assert s.status == "sent"
        assert s.counts["targeted"] == round(SIZE * SHARES[lang])
        assert s.counts["failed"] == s.counts["targeted"] // 50
        assert s.counts["delivered"] == s.counts["targeted"] - s.counts["failed"]
        assert s.counts["read"] == s.counts["delivered"] // 2
    partner = await _partner(sandbox)
    assert partner["segment_requests"] == 3
    assert partner["segment_replays"] == 0
    assert set(partner["segment_fanouts"].values()) == {1}
    by_id = {f["idempotency_key"]: f for f in partner["segments"].values()}
    for s in segs.values():  # what the store keeps is what the partner counted
        assert {k: by_id[s.id][k] for k in SEGMENT_COUNTS} == s.counts

    # the status API and /metrics show them beside the per-recipient counts
    async with aiohttp.ClientSession() as http:
        url = f"{gateway.public_url}/advisories/{record['id']}/status"
        async with http.get(url, headers=await bearer(gateway, "press")) as resp:
            body = await resp.json()
        async with http.get(f"{gateway.public_url}/metrics", headers=await bearer(gateway)) as resp:
            text = await resp.text()
    assert body["by_channel"]["push"] == {"delivered": 20}
    console = Console(record=True, width=160)  # `broadcast-gateway status` prints this table
    console.print(segments_table(body["segments"], record["id"]))
    printed = console.export_text()
    for s in segs.values():
        assert f"{s.counts['delivered']:,}" in printed
    assert "en (default)" in printed
    assert sum(s["delivered"] for s in body["segments"]) == sum(s.counts["delivered"] for s in segs.values())
    scraped = {
        s.labels["count"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "gateway_segment_recipients"
        for s in f.samples
        if s.labels["channel"] == "push"
    }
    for k in SEGMENT_COUNTS:
        assert scraped[k] == sum(s.counts[k] for s in segs.values()), k
    assert scraped["requests_sent"] == 3


async def test_a_cancel_reaches_the_partner_and_stops_its_fan_out(
    gateway: Gateway, sandbox: SandboxProcess
) -> None:
    # a slow fan-out (50 steps of 0.05 s): the cancel lands while the partner is still reaching users
    await sandbox.configure("push", segment_size=SIZE, segment_steps=50)
    record = signed(advisory(audience={"segments": [GEO]}))  # the partner's audience only
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)

    async def reaching() -> bool:
        segs = await _segments(gateway, record["id"])
        return len(segs) == 3 and all(s.counts["delivered"] > 0 for s in segs)

    await eventually(reaching, what="the partner reaching users in every language")
    cancel = signed(advisory(id=f"{record['id']}-cancel", msg_type="cancel", references=[record["id"]]))
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, cancel)

    async def cancelled() -> bool:
        return all(s.status == "cancelled" for s in await _segments(gateway, record["id"]))

    await eventually(cancelled, what="every segment request cancelled at the partner")
    segs = await _segments(gateway, record["id"])
    partner = await _partner(sandbox)
    assert partner["segment_cancels"] == 3
    for s in segs:
        assert s.counts["cancelled"] > 0, "users not yet reached are not reached"
        assert s.counts["delivered"] + s.counts["failed"] + s.counts["cancelled"] == s.counts["targeted"]
    fanouts = {f["idempotency_key"]: f for f in partner["segments"].values()}
    assert all(fanouts[s.id]["final"] and fanouts[s.id]["cancelled"] == s.counts["cancelled"] for s in segs)
    assert gateway.store is not None
    assert await gateway.store.counts(record["id"]) == {}  # no one of our directory was planned


async def test_an_update_reaches_the_partner_as_an_update_of_what_it_sent(
    gateway: Gateway, sandbox: SandboxProcess
) -> None:
    await sandbox.configure("push", segment_size=SIZE, segment_steps=50)
    v1 = signed(advisory(audience={"segments": [GEO]}))
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, v1)

    async def sent(version: int) -> bool:
        segs = [s for s in await _segments(gateway, v1["id"]) if s.version == version]
        return len(segs) == 3 and all(s.status == "sent" for s in segs)

    await eventually(lambda: sent(1), what="v1 sent to the segment")
    data = {**advisory()["data"], "hotline": "+7 7172 11 11 11"}
    v2 = signed(advisory(id=v1["id"], version=2, msg_type="update", audience={"segments": [GEO]}, data=data))
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, v2)
    await eventually(lambda: sent(2), what="v2 sent to the segment")

    segs = await _segments(gateway, v1["id"])
    old = {s.language: s for s in segs if s.version == 1}
    new = {s.language: s for s in segs if s.version == 2}
    partner = await _partner(sandbox)
    for lang, s in new.items():
        assert s.replaces == old[lang].partner_id  # the request named what it updates
        assert old[lang].status == "cancelled"
        assert old[lang].reason == "updated by v2"
        assert partner["segments"][old[lang].partner_id]["updated_by"] == s.partner_id
    assert partner["segment_cancels"] == 0  # an update, not a cancel and a new alert
    assert set(partner["segment_fanouts"].values()) == {1}  # one fan-out per version × language


async def test_a_crash_after_the_partners_answer_sends_no_second_fan_out(
    settings: Settings, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    """The partner took the requests but the store never heard (the process died in between): the
    next sender sends the same idempotency keys and the partner answers from its memory."""
    await sandbox.configure("push", segment_size=SIZE)
    adv = Advisory.model_validate(advisory(audience={"segments": [GEO]}))
    store = await Store.open(settings.store.url)
    try:
        await store.accept(adv, adv.model_dump(mode="json"), {})
        renderer = Renderer(settings.rendering.templates_path(), settings.rendering.default_language)
        async with aiohttp.ClientSession() as http:
            adapters = build_adapters(settings, http)
            await store.plan_segments(segment_rows(adv, renderer, adapters))
            assert await SegmentSender(store, renderer, adapters, settings.dispatch).step() == 3
            first = {s.id: s.partner_id for s in await store.segments(adv.id)}
            async with store.begin_write() as conn:  # the crash: the answers never reached the store
                await conn.execute(sa.update(segment_deliveries).values(status="planned", partner_id=None))
            assert await SegmentSender(store, renderer, adapters, settings.dispatch).step() == 3
            again = {s.id: s.partner_id for s in await store.segments(adv.id)}
    finally:
        await store.close()
    partner = await _partner(sandbox)
    assert again == first  # the same partner ids: the first answers, given again
    assert set(first.values()) == set(partner["segments"])  # and they are the partner's own
    assert (partner["segment_requests"], partner["segment_replays"]) == (6, 3)
    assert sorted(partner["segment_fanouts"].values()) == [1, 1, 1]


async def test_a_segment_on_a_channel_without_segments_is_dead_lettered_naming_the_field(
    settings: Settings, sandbox: SandboxProcess
) -> None:
    async with running_gateway(settings, sandbox) as gw:
        record = signed(advisory(audience={"segments": [{"channel": "email", "segment": "all"}]}))
        await publish(gw.bootstrap_servers, gw.settings.kafka.topic_advisories, record)
        (dead,) = await read_topic(gw.bootstrap_servers, gw.settings.kafka.topic_dlq, 1)
        assert gw.store is not None
        assert await gw.store.advisory_state(record["id"], 1) is None
    headers = dict(dead.headers)
    assert headers["error"] == b"schema"
    assert b"audience.segments[0].channel" in headers["reason"]
    assert b"takes no segment requests" in headers["reason"]
