"""SMS over the aggregator HTTP API: encodings the network accepts, DLRs back to delivered."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from channels.base import Message, hmac_headers
from channels.sms_http import SmsHttpAdapter, SmsHttpSettings
from gateway.app import Gateway
from gateway.cli import publish
from gateway.directory import import_file
from gateway.errors import AuthError
from gateway.models import Status, now
from gateway.sandbox.process import SandboxProcess
from tests.conftest import advisory, eventually, load_recipients, reached, read_topic, signed

KAZAKH = "Елден шығыңыз: өткізу пункті ашық. Консулдық жедел желі: +7 7172 00 00 00"


@pytest_asyncio.fixture
async def adapter(sandbox: SandboxProcess, secret: str) -> AsyncIterator[SmsHttpAdapter]:
    async with aiohttp.ClientSession() as session:
        settings = SmsHttpSettings(adapter="sms-http", base_url=sandbox.url, secret=secret)
        yield SmsHttpAdapter("sms-http", settings, session)


def _sms(key: str, to: str, text: str) -> Message:
    return Message(key, to, {"body": text}, "kk", "adv", 1, 0, now() + timedelta(hours=1))


async def test_kazakh_goes_as_ucs2_and_english_as_gsm7_and_the_aggregator_takes_both(
    adapter: SmsHttpAdapter, sandbox: SandboxProcess
) -> None:
    results = await adapter.send(
        [_sms("k1", "+77011234567", KAZAKH * 3), _sms("e1", "+447911123456", "Leave now")]
    )
    assert [r.outcome for r in results] == ["accepted", "accepted"]
    stats = (await sandbox.stats())["channels"]["sms-http"]
    assert stats["encodings"] == {"gsm7": 1, "ucs2": 1}
    assert stats["parts"] == 4 + 1  # 3 × 73 UCS-2 units = 219 → 4 parts of ≤ 67; "Leave now" → 1


async def test_an_invalid_number_is_rejected_by_the_aggregator_not_retried(adapter: SmsHttpAdapter) -> None:
    (result,) = await adapter.send([_sms("bad", "+7000", "Leave now")])
    assert result.outcome == "rejected"
    assert "to:" in (result.reason or "")


def test_dlr_states_map_to_delivery_statuses(secret: str) -> None:
    adapter = SmsHttpAdapter("sms-http", SmsHttpSettings(adapter="sms-http", secret=secret), None)  # type: ignore[arg-type]
    dlrs = [
        {"reference": "a", "status": "DELIVRD"},
        {"reference": "b", "status": "UNDELIV"},
        {"reference": "c", "status": "EXPIRED"},
        {"reference": "d", "status": "ENROUTE"},  # not final: nothing recorded
        {"reference": "e", "status": "REJECTD"},
    ]
    body = json.dumps({"dlrs": dlrs}).encode()
    got = adapter.parse_receipts(body, hmac_headers(secret, body))
    assert [(r.delivery_id, r.status) for r in got] == [
        ("a", Status.DELIVERED),
        ("b", Status.FAILED),
        ("c", Status.FAILED),
        ("e", Status.FAILED),
    ]
    with pytest.raises(AuthError):
        adapter.parse_receipts(body, hmac_headers("wrong", body))


async def test_an_sms_broadcast_ends_delivered_by_dlr(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    await load_recipients(gateway, tmp_path, 150, reach="phone", languages="kk")
    record = signed(advisory(channels=["push", "sms-http"]))  # no app users: the cascade picks SMS
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)
    await eventually(
        lambda: reached(gateway, record["id"], "delivered", 150, "sms-http"), what="150 SMS delivered"
    )
    stats = (await sandbox.stats())["channels"]["sms-http"]
    per = stats["by_advisory"][f"{record['id']}@v1"]
    assert (per["accepted"], per["unique_recipients"], per["duplicates"]) == (150, 150, 0)
    assert stats["encodings"] == {"ucs2": 150}


async def test_an_advisory_too_long_for_its_sms_part_limit_is_dead_lettered_naming_language_and_channel(
    gateway: Gateway,
) -> None:
    record = signed(advisory(channels=["sms-http"], max_sms_parts=1))
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)
    (dead,) = await read_topic(gateway.bootstrap_servers, gateway.settings.kafka.topic_dlq, 1)
    reason = dict(dead.headers)["reason"].decode()
    assert "language 'kk' on channel 'sms-http'" in reason  # English fits one part; Kazakh is UCS-2
    assert "SMS parts" in reason
    assert "the limit is 1" in reason


async def test_an_invalid_number_skips_that_sms_with_its_reason_and_the_cascade_goes_on(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    path = tmp_path / "mixed.csv"
    path.write_text(
        "id,phone,app_user,country\n"
        "ok,+77011234567,,XA\n"
        "typo,+7 701 12,app-typo,XA\n"  # invalid phone, but on the super-app
        "lost,12345,,XA\n",  # invalid phone, nothing else
        encoding="utf-8",
    )
    assert gateway.store is not None
    report = await import_file(gateway.store, path)
    assert (report.loaded, [w.line for w in report.warnings]) == (3, [3, 4])
    record = signed(advisory(channels=["sms-http", "push"]))
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)
    store = gateway.store

    async def settled() -> bool:
        counts = await store.counts(record["id"])
        return (
            counts.get("sms-http", {}).get("delivered") == 1 and counts.get("push", {}).get("delivered") == 1
        )

    await eventually(settled)
    assert await store.counts(record["id"]) == {
        "sms-http": {"delivered": 1, "skipped": 2},
        "push": {"delivered": 1},
    }
    skipped = await store.delivery_of(record["id"], 1, "lost", "sms-http")
    assert skipped is not None
    assert skipped["reason"] == "invalid phone number: not a valid international (E.164) number"
