"""The gateway as its own process, SIGKILLed between planning and sending and in the middle of
sending, then started again: every recipient gets exactly one push at the sandbox."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from gateway.broker import free_port
from gateway.cli import publish
from gateway.directory import import_file
from gateway.sandbox.process import SandboxProcess
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import advisory, eventually, gateway_process, signed

pytestmark = pytest.mark.slow


async def _counts(store: Store, advisory_id: str) -> dict[str, int]:
    return (await store.counts(advisory_id)).get("push", {})


async def test_killed_after_planning_and_mid_send_every_recipient_gets_exactly_one_push(
    settings: Settings, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    n = 3000
    csv = tmp_path / "r.csv"
    csv.write_text(
        "id,languages,app_user,country\n" + "".join(f"r{i:05d},kk,app-{i},XA\n" for i in range(n)),
        encoding="utf-8",
    )
    store = await Store.open(settings.store.url)
    try:
        await import_file(store, csv)
        await sandbox.point_at(f"http://127.0.0.1:{settings.http.port}")
        kafka = settings.kafka.bootstrap_servers
        assert kafka is not None

        # 1. intake only: the advisory is planned, nothing sent; then SIGKILL
        first = signed(advisory())
        async with gateway_process(settings, ["intake"]) as proc:
            await publish(kafka, settings.kafka.topic_advisories, first)

            async def planned() -> bool:
                return await store.plan_finished(first["id"], 1)

            await eventually(planned, within=60, what="advisory planned")
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        assert (await sandbox.stats())["channels"]["push"]["accepted"] == 0
        assert await _counts(store, first["id"]) == {"queued": n}

        # 2. every role, with a slow partner; SIGKILL once a third of the second advisory is accepted
        await sandbox.faults(latency_s=0.3, count=-1)
        second = signed(advisory())
        async with gateway_process(settings, ["intake", "dispatch", "receipts"]) as proc:
            await eventually(
                lambda: _delivered(store, first["id"], n), within=90, what="first advisory delivered"
            )
            await publish(kafka, settings.kafka.topic_advisories, second)

            async def partly_sent() -> bool:
                by = (await sandbox.stats())["channels"]["push"]["by_advisory"]
                return by.get(f"{second['id']}@v1", {}).get("accepted", 0) >= n // 3

            await eventually(partly_sent, within=90, what="a third of the second advisory accepted")
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        partial = (await sandbox.stats())["channels"]["push"]["by_advisory"][f"{second['id']}@v1"]["accepted"]
        assert n // 3 <= partial < n, "the kill landed mid-send"

        # 3. started again: the rest is sent, nothing twice
        await sandbox.faults(count=0)
        async with gateway_process(settings, ["intake", "dispatch", "receipts"]):
            await eventually(lambda: _delivered(store, second["id"], n), within=120, what="second delivered")

        stats = (await sandbox.stats())["channels"]["push"]
        for adv in (first, second):
            counted = stats["by_advisory"][f"{adv['id']}@v1"]
            assert counted["unique_recipients"] == n
            assert counted["duplicates"] == 0
            assert counted["accepted"] == n
    finally:
        await store.close()


async def _delivered(store: Store, advisory_id: str, n: int) -> bool:
    return (await _counts(store, advisory_id)).get("delivered", 0) == n


async def test_sigterm_stops_the_service_cleanly(settings: Settings) -> None:
    async with gateway_process(settings, ["intake", "dispatch", "receipts"]) as proc:

        async def healthy() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{settings.http.port}/healthz") as resp,
                ):
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(healthy, within=60, what="gateway healthy")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0


async def test_broker_command_serves_the_gateway_topics_until_sigterm() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "broker",
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "GATEWAY__LOGGING__LEVEL": "warning"},
    )
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert f"127.0.0.1:{port}" in first
        admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        await admin.start()
        try:
            assert {
                "advisories",
                "deliveries.push",
                "deliveries.urgent.push",
                "delivery-events",
                "advisories.dlq",
            } <= set(await admin.list_topics())
        finally:
            await admin.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
