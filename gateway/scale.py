"""``broadcast-gateway drill scale --instances N``: several gateway processes share one broadcast.

N gateway processes (every role) run in one consumer group on one PostgreSQL database (a fresh one,
made on the server ``--postgres`` names and dropped after), with the embedded broker and the sandbox
partners as in the other drills. One advisory goes to N recipients on the push channel; planning is
leased to one instance at a time, dispatch is split by partitions, receipts go to the first
instance. With more than one instance, the last one is SIGKILLed when 30 % of the broadcast has been
accepted by the partner: its partitions move to the others, which replay what it had not committed
(``--no-kill``: none is, to measure what N instances do together).

Reported: each instance's share (messages the partner accepted from it, from its own /metrics,
sampled until it died: for the killed one a lower bound — a batch answered between its last sample
and the kill, and recorded, is in nobody's share), ``lost`` and ``duplicates`` from the partner's
own counts, time to all-sent and all-delivered, and whether the store's counters agree with a
recount. Passes with 0 lost and 0 duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from gateway import logging as gw_logging
from gateway.auth import Tokens
from gateway.broker import EmbeddedBroker, free_port
from gateway.drill import DrillError, GatewayProcess, Rig
from gateway.models import FINAL, PENDING
from gateway.sandbox.process import SandboxProcess

POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
KILL_AT = 0.30


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server of ``server_url`` (dropped after, whatever is connected
    to it); yields its URL. The scale drill's, and the tests'."""
    name = f"gw_{secrets.token_hex(5)}"
    admin = server_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield server_url.rsplit("/", 1)[0] + "/" + name
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


class Instance(GatewayProcess):
    """One gateway process of the drill, and what the partner accepted from it."""

    def __init__(self, number: int, env: dict[str, str], workdir: Path) -> None:
        super().__init__(env, workdir, free_port(), str(number))
        self.number = number
        self.accepted = 0  # messages the partner accepted from this instance (its last /metrics)

    @property
    def killed(self) -> bool:
        return self.kills > 0

    async def sample(self, token: str) -> None:
        """This instance's count of messages the push partner accepted, from its /metrics."""
        if self.killed:
            return
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                http.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {token}"}) as resp,
            ):
                text = await resp.text()
            for family in text_string_to_metric_families(text):
                if family.name == "gateway_channel_messages":
                    for s in family.samples:
                        if s.labels.get("channel") == "push" and s.labels.get("outcome") == "accepted":
                            self.accepted = int(s.value)


async def run_scale(
    n: int, instances: int, deadline_s: float, postgres: str = POSTGRES, kill: bool = True
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-drill-scale-"))
    started = time.monotonic()
    report: dict[str, Any] = {
        "drill": "scale",
        "channel": "push",
        "recipients": n,
        "instances": instances,
        "workdir": str(workdir),
    }
    async with (
        fresh_database(postgres) as store_url,
        EmbeddedBroker() as broker,
        SandboxProcess(secrets.token_urlsafe(32), receipt_delay_s=0.2) as sandbox,
    ):
        rig = Rig(workdir, broker, sandbox, n, "push")
        rig.env["GATEWAY__STORE__URL"] = store_url
        # pages, chunks and batches of 500, the partner's rate lifted: as bench measures (not the
        # fault drills' 100, which make a broadcast many small requests so that faults land mid-way)
        rig.env.update(
            {
                "GATEWAY__PLANNER__CHUNK_SIZE": "500",
                "GATEWAY__CHANNELS__PUSH__BURST": "500",
                "GATEWAY__CHANNELS__PUSH__RATE_PER_S": "1000000",
            }
        )
        gateways = [Instance(i, rig.env, workdir) for i in range(instances)]
        try:
            await rig.open()  # recipients into the store of rig.env: this drill's database
            await sandbox.point_at(gateways[0].url)  # receipts to the first instance, never killed
            for g in gateways:
                await g.start()
            for g in gateways:
                await rig.until(g.healthy, 60, f"instance {g.number} answering /healthz")
            report.update(await _broadcast(rig, gateways, deadline_s, kill))
            report["counters_agree"] = await rig.counters_agree()
        except DrillError as e:
            report["error"] = str(e)
        finally:
            for g in gateways:
                await g.stop()
            if rig.store is not None:
                await rig.store.close()
    report["seconds"] = round(time.monotonic() - started, 1)
    report["passed"] = "error" not in report and report.get("lost") == 0 and report.get("duplicates") == 0
    return report


async def _broadcast(rig: Rig, gateways: list[Instance], deadline_s: float, kill: bool) -> dict[str, Any]:
    assert rig.store is not None
    _, token = await Tokens(rig.store).create("drill-scale", ["operator"], actor="drill")
    record = rig.advisory("scale", severity="severe", urgency="expected")
    published = await rig.publish(record)
    victim = gateways[-1] if kill and len(gateways) > 1 else None
    pending = {s.value for s in PENDING}
    final = {s.value for s in FINAL}
    all_sent_s = all_final_s = None
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        await asyncio.gather(*(g.sample(token) for g in gateways))
        counted = await rig.counted(record)
        if victim is not None and not victim.killed and counted["accepted"] >= KILL_AT * rig.n:
            await victim.sample(token)
            await victim.kill()
        counts = await rig.counts(record["id"])
        done = sum(counts.values()) >= rig.n
        if all_sent_s is None and done and not any(counts.get(s) for s in pending):
            all_sent_s = time.time() - published
        if done and all(s in final for s in counts):
            all_final_s = time.time() - published
            break
        await asyncio.sleep(0.5)  # sampling other processes' progress
    if all_final_s is None:
        raise DrillError(f"not all final within {deadline_s:.0f}s: {await rig.counts(record['id'])}")
    await asyncio.gather(*(g.sample(token) for g in gateways))
    report = await rig.report(record, rig.n)
    return {
        **report,
        "all_sent_s": round(all_sent_s or all_final_s, 2),
        "all_delivered_s": round(all_final_s, 2),
        "killed_instance": victim.number if victim is not None else None,
        "share": {f"instance-{g.number}": g.accepted for g in gateways},
        "planned_by_last": await _planner(rig, record["id"]),
    }


async def _planner(rig: Rig, advisory_id: str) -> str | None:
    """The instance that held the planning lease last (host:pid:tag)."""
    import sqlalchemy as sa

    from gateway.schema import advisories

    assert rig.store is not None
    async with rig.store.engine.connect() as conn:
        q = sa.select(advisories.c.planner).where(advisories.c.id == advisory_id)
        return (await conn.execute(q)).scalar()


def main(n: int, instances: int, as_json: bool, deadline_s: float, postgres: str, kill: bool = True) -> int:
    gw_logging.configure("warning", "auto")
    report = asyncio.run(run_scale(n, instances, deadline_s, postgres, kill))
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        for key, value in report.items():
            sys.stdout.write(f"{key:>24}: {value}\n")
    return 0 if report["passed"] else 1
