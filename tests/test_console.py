"""The console in a real headless Chromium (Debian's ``chromium``, driven by the ``playwright``
package's client; never a downloaded browser): during a broadcast the operations room reaches 100 %
and agrees with the store's counters and the sandbox partner's own count; a second person approves
what the first submitted (and the first cannot); the cancel button stops a live advisory; the press
desk's preview shows the part count of a Kazakh SMS; the console reads without JavaScript, on a
phone-sized screen, in kk/ru/en. Each test saves a screenshot under test-output/console/."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from channels.sms import layout
from gateway.app import Gateway
from gateway.rendering import Renderer
from gateway.sandbox.process import SandboxProcess
from gateway.settings import PROJECT_ROOT
from gateway.trends import LATENCIES
from tests.conftest import (
    PRIVATE_KEY,
    PUBLIC_KEY,
    SENDER,
    advisory,
    eventually,
    make_settings,
    running_gateway,
)
from tests.conftest import load_recipients as load

# one gateway for the module, and later tests read what earlier ones did: one worker runs them all
# (make test: --dist loadgroup)
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("console")]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = Path(os.environ.get("GATEWAY_TEST_OUTPUT", PROJECT_ROOT / "test-output")) / "console"

playwright_api = pytest.importorskip("playwright.async_api")


def _chromium() -> str:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is required when CI=true (.ci/run installs Debian's chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return CHROMIUM


class Room:
    """The running gateway, its sandbox, tokens per person, and a browser."""

    def __init__(self, gw: Gateway, sandbox: SandboxProcess, browser: Any, tmp: Path) -> None:
        self.gw, self.sandbox, self.browser, self.tmp = gw, sandbox, browser, tmp
        self.url = gw.public_url
        self.tokens: dict[str, str] = {}

    async def token(self, name: str, *roles: str) -> str:
        assert self.gw.tokens is not None
        _, token = await self.gw.tokens.create(name, roles, actor="test")
        self.tokens[name] = token
        return token

    async def page(self, who: str, **context: Any) -> Any:
        """A new browser context signed in as ``who`` through the login form."""
        ctx = await self.browser.new_context(**context)
        page = await ctx.new_page()
        await page.goto(f"{self.url}/console/")
        assert "/console/login" in page.url  # not signed in: to the login page
        await page.fill("input[name=token]", self.tokens[who])
        await page.click("button[type=submit]")
        await page.wait_for_url(f"{self.url}/console/")
        return page

    async def submit(self, who: str, record: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.url}/advisories", json=record, headers=headers) as resp,
        ):
            body: dict[str, Any] = await resp.json()
            assert resp.status == 202, body
            return body


async def _shot(page: Any, name: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(OUTPUT / f"{name}.png"), full_page=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def room(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> AsyncIterator[Room]:
    executable = _chromium()
    tmp = tmp_path_factory.mktemp("console")
    async with SandboxProcess(uuid.uuid4().hex, receipt_delay_s=0.05) as sandbox:
        settings = make_settings(
            tmp,
            kafka_bootstrap,
            sandbox,
            # extreme advisories wait for a second person; the others go at once
            GATEWAY__APPROVAL__RULES=json.dumps([{"severity": ["extreme"]}]),
            GATEWAY__API__SIGNING_KEYS=json.dumps({SENDER: PRIVATE_KEY}),
            GATEWAY__INTAKE__TRUSTED_KEYS=json.dumps({SENDER: PUBLIC_KEY}),
            GATEWAY__PLANNER__POLL_S="0.2",
        )
        async with (
            running_gateway(settings, sandbox) as gw,
            playwright_api.async_playwright() as pw,
        ):
            browser = await pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            r = Room(gw, sandbox, browser, tmp)
            await r.token("duty-operator", "operator")
            await r.token("press-officer", "press", "approver")  # may approve others' only
            await r.token("second-approver", "approver")
            try:
                yield r
            finally:
                await browser.close()


def _record(**over: Any) -> dict[str, Any]:
    record = advisory(id=f"con-{uuid.uuid4().hex[:8]}", **{"severity": "severe", **over})
    record.pop("signature", None)
    return record


async def test_the_operations_room_shows_a_broadcast_reach_100_percent_live_and_agrees_with_the_partner(
    room: Room,
) -> None:
    await load(room.gw, room.tmp, 300, country="XL", prefix="live")
    page = await room.page("duty-operator")
    record = _record(audience={"countries": ["XL"]}, channels=["push"])
    await room.submit("press-officer", record)
    card = page.locator(f"article[data-advisory='{record['id']}']")
    # no reload: the server-sent events bring it in and move the bar to 100 %
    await card.wait_for(timeout=30_000)
    await card.locator(".bar >> nth=0 >> .pct[data-percent='100']").wait_for(timeout=60_000)
    await _shot(page, "room-100-percent")
    shown = await card.locator(".bar >> nth=0 >> .nums").inner_text()
    assert gw_store(room) is not None
    counts = await gw_store(room).counts(record["id"])
    stats = (await room.sandbox.stats())["channels"]["push"]["by_advisory"][f"{record['id']}@v1"]
    assert counts["push"].get("delivered", 0) + counts["push"].get("read", 0) == 300
    assert stats["unique_recipients"] == 300
    assert stats["duplicates"] == 0
    assert shown.startswith("300 / 300"), shown
    # per language as planned: the recipients' chains kk|ru, ru, en, de|en → kk, ru, en, en
    await page.goto(f"{room.url}/console/advisories/{record['id']}")
    cells = await page.locator("table.cells tbody tr td:first-child").all_inner_texts()
    assert sorted(cells) == ["push · en", "push · kk", "push · ru"]
    await _shot(page, "advisory-detail")
    await page.context.close()


def gw_store(room: Room) -> Any:
    return room.gw.store


async def test_a_second_person_approves_in_the_console_and_the_submitter_cannot(room: Room) -> None:
    await load(room.gw, room.tmp, 20, country="XM", prefix="appr")
    record = _record(audience={"countries": ["XM"]}, severity="extreme")
    answer = await room.submit("press-officer", record)
    assert answer["needs_approval"]
    submitter = await room.page("press-officer")
    await submitter.goto(f"{room.url}/console/approvals")
    await submitter.locator(f"tr[data-advisory='{record['id']}'] a").click()
    assert await submitter.locator("section.decide p.error").count() == 1  # "you submitted this"
    await submitter.click("button[value=approve]")
    assert "a second person must decide" in await submitter.locator("p.error[role=alert]").inner_text()
    assert await room.gw.store.advisory_state(record["id"], 1) is not None  # type: ignore[union-attr]
    assert (await room.gw.store.versions(record["id"]))[-1].state.value == "pending_approval"  # type: ignore[union-attr]

    approver = await room.page("second-approver")
    await approver.goto(f"{room.url}/console/approvals")
    await approver.locator(f"tr[data-advisory='{record['id']}'] a").click()
    await approver.fill("input[name=reason]", "checked against the consul's list")
    await approver.click("button[value=approve]")
    await approver.locator("p.flash").wait_for()
    assert (await room.gw.store.versions(record["id"]))[-1].state.value == "active"  # type: ignore[union-attr]
    await approver.locator("section.version .pct[data-percent='100']").first.wait_for(timeout=60_000)
    await _shot(approver, "approved-and-delivered")
    history = await approver.locator("table.audit").inner_text()
    assert "advisory.active" in history
    assert "second-approver" in history
    await submitter.context.close()
    await approver.context.close()


async def test_the_cancel_button_stops_a_live_advisory(room: Room) -> None:
    await load(room.gw, room.tmp, 40, country="XN", prefix="stop")
    await room.sandbox.faults("push", status=503, count=-1)  # held: every push pending
    try:
        record = _record(audience={"countries": ["XN"]})
        await room.submit("press-officer", record)

        async def planned() -> bool:
            counts = await room.gw.store.counts(record["id"])  # type: ignore[union-attr]
            return sum(counts.get("push", {}).values()) == 40

        await eventually(planned, what="planned")
        page = await room.page("duty-operator")
        await page.goto(f"{room.url}/console/advisories/{record['id']}")
        page.once("dialog", lambda dialog: dialog.accept())
        await page.fill("section.cancel input[name=confirm]", record["id"])
        await page.fill("section.cancel input[name=reason]", "wrong crossing named")
        await page.click("section.cancel button.danger")
        await page.locator("p.flash").wait_for()
        assert (await page.locator("h1 .state").inner_text()) == "cancelled"
        await _shot(page, "cancelled")
    finally:
        await room.sandbox.faults("push", count=0)
    counts = await room.gw.store.counts(record["id"])  # type: ignore[union-attr]
    assert counts["push"] == {"cancelled": 40}
    stats = (await room.sandbox.stats())["channels"]["push"]["by_advisory"]
    assert stats.get(f"{record['id']}@v1", {}).get("accepted", 0) == 0
    await page.context.close()


async def test_the_press_desk_previews_the_sms_part_count_of_a_kazakh_text(room: Room) -> None:
    page = await room.page("press-officer", viewport={"width": 390, "height": 844})  # a phone
    await page.goto(f"{room.url}/console/compose?lang=kk")
    assert await page.locator("html").get_attribute("lang") == "kk"
    data = advisory()["data"]
    data["open_crossings"] = [
        {"name": f"Өткізу пункті №{i}", "to": "Белмора", "hours": "тәулік бойы"} for i in range(1, 5)
    ]
    await page.fill("input[name=id]", "preview-kk-1")
    await page.fill("input[name=countries]", "XA")
    await page.fill("textarea[name=data]", json.dumps(data, ensure_ascii=False))
    await page.check("input[name=channels][value=sms-http]")
    await page.click("button[value=preview]")
    card = page.locator("article.preview[data-channel='sms-http'][data-language='kk']")
    await card.wait_for()
    shown = await card.locator("li[data-fact=sms_parts] b").inner_text()
    record = advisory(id="preview-kk-1", data=data, channels=["sms-http"])
    from gateway.models import Advisory

    renderer = Renderer(PROJECT_ROOT / "templates", "en")
    body = renderer.render(Advisory.model_validate(record), "kk", "sms", ("body",))["body"]
    expected = layout(body)
    assert expected.encoding == "ucs2"  # Kazakh letters are not GSM-7
    assert int(shown) == len(expected.parts) > 1
    assert await card.locator("li[data-fact=encoding] b").inner_text() == "UCS2"
    await _shot(page, "press-desk-preview-kk")
    # live: typing a shorter text updates the preview without pressing the button again
    data["open_crossings"] = data["open_crossings"][:1]
    await page.fill("textarea[name=data]", json.dumps(data, ensure_ascii=False))
    shorter = renderer.render(
        Advisory.model_validate(advisory(id="preview-kk-2", data=data, channels=["sms-http"])),
        "kk",
        "sms",
        ("body",),
    )["body"]
    fewer = str(len(layout(shorter).parts))
    assert fewer != shown
    await page.locator(
        "article.preview[data-channel='sms-http'][data-language='kk'] "
        f"li[data-fact=sms_parts] b:text-is('{fewer}')"
    ).wait_for(timeout=10_000)
    await page.context.close()


async def test_the_console_reads_without_javascript_and_refuses_the_wrong_role(room: Room) -> None:
    page = await room.page("duty-operator", java_script_enabled=False)
    await page.goto(f"{room.url}/console/history?lang=ru")
    assert "История" in await page.locator("h1").inner_text()
    await page.goto(f"{room.url}/console/")
    assert await page.locator("#live h2").first.inner_text() == "Текущие оповещения"
    # an operator may not decide: the decision form is refused with 403
    response = await page.request.post(
        f"{room.url}/console/advisories/x/decide",
        form={"decision": "approve", "version": "1"},
        headers={"Origin": room.url},
    )
    assert response.status == 403
    # a form posted from another site is refused whatever the cookie
    response = await page.request.post(
        f"{room.url}/console/advisories/x/cancel",
        form={"confirm": "x"},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status == 403
    await _shot(page, "no-javascript-ru")
    await page.context.close()


async def _scrape(room: Room) -> dict[str, list[Any]]:
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {room.tokens['duty-operator']}"}
    async with aiohttp.ClientSession() as http, http.get(f"{room.url}/metrics", headers=headers) as resp:
        assert resp.status == 200
        text = await resp.text()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _deliveries(scraped: dict[str, list[Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for sample in scraped["gateway_deliveries"]:
        out.setdefault(sample.labels["channel"], {})[sample.labels["status"]] = int(sample.value)
    return out


async def test_metrics_scraped_during_a_broadcast_match_the_store_and_carry_no_personal_data(
    room: Room,
) -> None:
    await load(room.gw, room.tmp, 60, country="XP", prefix="metr")
    store = room.gw.store
    assert store is not None
    await room.sandbox.faults("push", status=503, count=-1)  # mid-broadcast: held, counts stand still
    try:
        record = _record(audience={"countries": ["XP"]})
        await room.submit("press-officer", record)

        async def planned() -> bool:
            return sum((await store.counts(record["id"])).get("push", {}).values()) == 60

        await eventually(planned, what="planned")
        during = _deliveries(await _scrape(room))
        assert during == await store.counts()
        assert during["push"].get("queued", 0) >= 60

        async def retried() -> bool:  # planned is not yet tried: hold the fault until a 503 was answered
            scraped = await _scrape(room)
            return any(
                s.labels.get("channel") == "push" and s.value > 0
                for s in scraped.get("gateway_retries", [])
                if s.name == "gateway_retries_total"
            )

        await eventually(retried, what="a 503 answered and retried while the partner is down")
    finally:
        await room.sandbox.faults("push", count=0)

    async def delivered() -> bool:
        return (await store.counts(record["id"]))["push"] == {"delivered": 60}

    await eventually(delivered, what="delivered once the partner is back")
    after = await _scrape(room)
    assert _deliveries(after) == await store.counts()
    by_name = {s.name: s for samples in after.values() for s in samples if s.labels.get("channel") == "push"}
    assert by_name["gateway_dispatch_latency_seconds_count"].value >= 60
    assert by_name["gateway_delivery_latency_seconds_count"].value >= 60
    assert by_name["gateway_retries_total"].value > 0  # the 503s were retried
    assert any(s.labels.get("group") for s in after["gateway_consumer_lag"])
    # labels are channels, statuses, outcomes, groups: no recipient, address or token anywhere
    labels = {v for samples in after.values() for s in samples for v in s.labels.values()}
    assert not any("metr" in v or "app-" in v or "gw_" in v for v in labels), labels


async def test_the_operations_room_draws_latency_over_time_and_channel_rates(room: Room) -> None:
    """After the broadcasts above: the dispatch latency chart has a push line, and the channel
    health table shows push's sent-per-minute and error share (from this process's metrics)."""
    # The console samples every 5 s; a line needs two intervals with push messages, which the
    # broadcasts above need not give (they may all have gone within one): broadcast until there are.
    assert room.gw.console is not None
    trends = room.gw.console.trends

    async def intervals(n: int) -> bool:
        return len(trends.series(LATENCIES[0], 0.5).get("push", [])) >= n

    for n in (1, 2):
        if not await intervals(n):
            country = "XP" if n == 1 else "XQ"
            await load(room.gw, room.tmp, 20, country=country, prefix=f"later{n}")
            await room.submit("press-officer", _record(audience={"countries": [country]}, channels=["push"]))
            await eventually(partial(intervals, n), within=60, what=f"{n} sampling intervals with push sent")
    page = await room.page("duty-operator", viewport={"width": 390, "height": 844})
    line = page.locator("figure[data-chart=dispatch_p50] polyline")
    # attached, not "visible": two intervals with the same p50 draw a flat line, which has no height
    await line.first.wait_for(state="attached", timeout=30_000)
    assert len((await line.first.get_attribute("points") or "").split()) >= 2
    assert "push" in await page.locator("figure[data-chart=dispatch_p50] .legend").inner_text()
    row = page.locator("table.health tr[data-channel=push] td")
    cells = await row.all_inner_texts()
    assert cells[1] == "closed"
    assert cells[2] != "—"
    assert int(cells[2].replace("\u202f", "")) > 0, cells
    await _shot(page, "room-latency-phone")
    await page.context.close()


async def test_the_press_desk_names_what_is_wrong_with_pasted_cap_and_sends_nothing(room: Room) -> None:
    page = await room.page("press-officer")
    await page.goto(f"{room.url}/console/compose")
    await page.check("input[name=mode][value=cap]")
    cap = (
        "<?xml version='1.0'?><alert xmlns='urn:oasis:names:tc:emergency:cap:1.2'>"
        "<identifier>broken-1</identifier></alert>"
    )
    await page.fill("textarea[name=cap]", cap)
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await page.click("button[value=submit]")
    assert (await answer.value).status == 422
    error = await page.locator("p.error[role=alert]").inner_text()
    assert "cap" in error.lower() or "sender" in error.lower(), error
    assert await room.gw.store.versions("broken-1") == []  # type: ignore[union-attr]
    await page.context.close()
