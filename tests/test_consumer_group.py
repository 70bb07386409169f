"""Two gateway processes in one consumer group on one PostgreSQL store: partitions move when the
second joins and again when it is stopped mid-broadcast; intake and dispatch survive both
rebalances, the survivor takes over, and every recipient gets each advisory once."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from gateway.broker import free_port
from gateway.cli import publish
from gateway.directory import import_file
from gateway.sandbox.process import SandboxProcess
from gateway.store import Store
from tests.conftest import (
    advisory,
    eventually,
    fresh_postgres_database,
    gateway_process,
    make_settings,
    signed,
)

pytestmark = pytest.mark.slow


async def _healthy(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


@pytest.mark.timeout(240)
async def test_two_instances_share_a_group_and_one_stopped_mid_broadcast_loses_nothing(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    n = 3000
    async with fresh_postgres_database() as url:
        settings = make_settings(
            tmp_path,
            kafka_bootstrap,
            sandbox,
            GATEWAY__STORE__URL=url,
            GATEWAY__KAFKA__SESSION_TIMEOUT_MS="3000",
            GATEWAY__PLANNER__CHUNK_SIZE="100",
            GATEWAY__CHANNELS__PUSH__BURST="100",
        )
        store = await Store.open(url)
        try:
            csv = tmp_path / "r.csv"
            rows = "".join(f"r{i:05d},kk,app-{i},XA\n" for i in range(n))
            csv.write_text("id,languages,app_user,country\n" + rows, encoding="utf-8")
            await import_file(store, csv)
            port_a, port_b = settings.http.port, free_port()
            env = {"GATEWAY__PLANNER__CHUNK_SIZE": "100", "GATEWAY__CHANNELS__PUSH__BURST": "100"}
            async with (
                gateway_process(settings, ["intake", "dispatch", "receipts"], **env) as a,
                gateway_process(
                    settings, ["intake", "dispatch", "receipts"], GATEWAY__HTTP__PORT=str(port_b), **env
                ) as b,
            ):
                await eventually(lambda: _healthy(port_a), within=60, what="instance A up")
                await eventually(lambda: _healthy(port_b), within=60, what="instance B up")
                await sandbox.point_at(f"http://127.0.0.1:{port_a}")
                await sandbox.faults(latency_s=0.05, count=-1)  # a broadcast of some seconds

                first = signed(advisory())
                await publish(kafka_bootstrap, settings.kafka.topic_advisories, first)

                async def accepted(record: dict[str, object], at_least: int) -> bool:
                    stats = (await sandbox.stats())["channels"]["push"]["by_advisory"]
                    return int(stats.get(f"{record['id']}@v1", {}).get("accepted", 0)) >= at_least

                await eventually(lambda: accepted(first, n * 3 // 10), within=90, what="30 % accepted")
                b.send_signal(signal.SIGTERM)  # stopped mid-broadcast: its partitions go to A
                assert await asyncio.wait_for(b.wait(), 60) == 0, "B drains and exits cleanly"

                second = signed(advisory())  # after the rebalance: A alone takes it in
                await publish(kafka_bootstrap, settings.kafka.topic_advisories, second)
                for record in (first, second):
                    await eventually(
                        lambda r=record: accepted(r, n), within=120, what=f"{record['id']} to all"
                    )

                async def all_delivered() -> bool:
                    counts = [(await store.counts(r["id"])).get("push", {}) for r in (first, second)]
                    return counts == [{"delivered": n}, {"delivered": n}]

                await eventually(all_delivered, within=60, what="every delivery delivered in the store")
                stats = (await sandbox.stats())["channels"]["push"]["by_advisory"]
                for record in (first, second):
                    mine = stats[f"{record['id']}@v1"]
                    assert (mine["unique_recipients"], mine["duplicates"]) == (n, 0)
                assert a.returncode is None, "A survived both rebalances"
                assert await _healthy(port_a)
        finally:
            await store.close()
