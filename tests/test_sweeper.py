"""Time-driven transitions on real planned deliveries: expiry, receipt timeout, and operator replay."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import aiohttp

from channels.base import hmac_headers
from gateway.app import Gateway
from gateway.cli import publish, replay
from gateway.models import now
from gateway.sandbox.process import SandboxProcess
from gateway.settings import Settings, SweeperSettings
from gateway.sweeper import Sweeper
from tests.conftest import (
    advisory,
    eventually,
    load_recipients,
    make_settings,
    reached,
    running_gateway,
    signed,
)


async def _counts(gw: Gateway, advisory_id: str) -> dict[str, int]:
    assert gw.store is not None
    return (await gw.store.counts(advisory_id)).get("push", {})


async def test_deliveries_still_pending_when_the_advisory_expires_become_expired(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, kafka_bootstrap, sandbox, GATEWAY__GATEWAY__ROLES="[intake]")
    async with running_gateway(settings) as gw:  # intake only: planned and queued, never sent
        await load_recipients(gw, tmp_path, 30)
        record = signed(advisory())
        await publish(gw.bootstrap_servers, settings.kafka.topic_advisories, record)
        await eventually(lambda: reached(gw, record["id"], "queued", 30), what="30 queued")
        assert gw.store is not None
        before_expiry = Sweeper(gw.store, SweeperSettings(), clock=lambda: now() + timedelta(hours=1))
        assert await before_expiry.sweep() == (0, 0)
        after_expiry = Sweeper(gw.store, SweeperSettings(), clock=lambda: now() + timedelta(hours=3))
        assert await after_expiry.sweep() == (30, 0)
        assert await _counts(gw, record["id"]) == {"expired": 30}


async def test_sent_without_a_receipt_becomes_unknown_and_a_late_receipt_still_counts(
    gateway: Gateway, sandbox: SandboxProcess, secret: str, tmp_path: Path
) -> None:
    await sandbox.point_at(None)  # the partner keeps its receipts
    await load_recipients(gateway, tmp_path, 5)
    record = signed(advisory())
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)
    await eventually(lambda: reached(gateway, record["id"], "sent", 5))
    assert gateway.store is not None
    sweeper = Sweeper(
        gateway.store, SweeperSettings(receipt_timeout_s=600), clock=lambda: now() + timedelta(hours=1)
    )
    assert await sweeper.sweep() == (0, 5)
    late = json.dumps(
        {
            "receipts": [
                {
                    "idempotency_key": (
                        await gateway.store.delivery_of(record["id"], 1, "r00000", "push") or {}
                    )["id"],
                    "status": "delivered",
                }
            ]
        }
    ).encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway.public_url}/receipts/push", data=late, headers=hmac_headers(secret, late)
        ) as resp,
    ):
        assert resp.status == 200
    assert await _counts(gateway, record["id"]) == {"unknown": 4, "delivered": 1}


async def test_replay_requeues_failed_deliveries_and_they_are_delivered_once(
    gateway: Gateway, settings: Settings, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    await sandbox.faults(status=400, count=-1)  # the partner refuses everything: permanent failures
    await load_recipients(gateway, tmp_path, 12)
    record = signed(advisory())
    await publish(gateway.bootstrap_servers, settings.kafka.topic_advisories, record)
    await eventually(lambda: reached(gateway, record["id"], "failed", 12), what="12 failed")
    await sandbox.faults(count=0)  # the cause is fixed
    assert await replay(settings, record["id"], None, 1000) == 12
    await eventually(
        lambda: reached(gateway, record["id"], "delivered", 12), what="12 delivered after replay"
    )
    counted = (await sandbox.stats())["channels"]["push"]["by_advisory"][f"{record['id']}@v1"]
    assert (counted["accepted"], counted["unique_recipients"], counted["duplicates"]) == (12, 12, 0)
    assert await replay(settings, record["id"], None, 1000) == 0, "nothing failed is left to replay"
