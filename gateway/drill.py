"""``broadcast-gateway drill {outage,crash,cancel,priority,poison}``: rehearse a bad day before a real one.

Each drill sets up what the demo does — the embedded broker, the sandbox partners as their own
process, a SQLite store in a temporary folder, N recipients (all on the super-app, so one channel is
counted) — and runs the gateway as **its own process**, so that it can be killed. Every number in the
report comes from the sandbox partner's own counts (what it accepted, for whom, when), not from the
gateway's word; the store's counts are shown beside them.

- ``outage``: the push partner answers 503 for a while, then 429 with Retry-After, then resets
  connections, then hangs until the client times out; then recovers.
- ``crash``: the gateway is SIGKILLed after the advisory is stored but before its plan is finished,
  and again at 15 %, 40 % and 70 % of the broadcast, and stopped with SIGTERM at 85 % (it drains
  and exits); each time it is started again.
- ``cancel``: a cancel is published when 30 % of the broadcast is accepted. ``sent_after_cancel``
  counts messages the partner accepted more than one second after the cancel was published.
- ``priority``: an urgent advisory is published while a bulk one is under way; the report gives the
  urgent advisory's time to its first partner request and to its last, and how far the bulk was.
- ``poison``: every bad record of gateway/poison.py (deep nesting, binary, wrong types, template
  runtime errors, header line breaks, oversized, forged, XML bombs, another sender's cancel and
  update) is put on the topic, then a good advisory. ``dead_lettered`` by kind (from the DLQ itself),
  ``intake_stalled_s`` (the longest time intake spent on one record), and the good advisory's
  ``good_delivered`` / ``duplicates`` from the partner's counts. Passes when every bad record is
  dead-lettered with its kind, the good one reaches everyone once, and nothing stalled 5 s.

``lost``: recipients who should have been notified and were not (for ``cancel``: messages the store
records as sent that the partner never accepted). ``duplicates``: a recipient accepted twice for
the same advisory. The exit status is 0 only when lost, duplicates and sent_after_cancel are 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer

from gateway import kafka, lifecycle
from gateway import logging as gw_logging
from gateway.broker import EmbeddedBroker, free_port
from gateway.cli import publish
from gateway.demo import demo_advisory, demo_env, write_recipients
from gateway.directory import import_file
from gateway.lifecycle import AdvisoryState
from gateway.models import PENDING
from gateway.poison import corpus
from gateway.sandbox.process import SandboxProcess
from gateway.signing import new_key, sign
from gateway.store import Store

DRILLS = ("outage", "crash", "cancel", "priority", "poison")
ROGUE = "embassy.rogue"  # a trusted sender of the drills, with no authority over the ministry's advisories
# an SMSC's receipts all written: the gateway has applied what it will once its `sent` count has stood
# still this long (more than the held receipts' retry, receipts.retry_s)
RECEIPTS_QUIET_S = 2.0
CHUNK = 100  # small chunks and batches: a broadcast is many partner requests, so faults land mid-way


class DrillError(Exception):
    """The drill could not run to its end (the report says how far it got)."""


class GatewayProcess:
    """``broadcast-gateway run`` as its own process on ``port``, its output in ``workdir``
    (gateway-<name>-<start>.log); started, killed and started again by the drills."""

    def __init__(self, env: dict[str, str], workdir: Path, port: int, name: str = "0") -> None:
        self.env = {**env, "GATEWAY__HTTP__PORT": str(port)}
        self.workdir = workdir
        self.port = port
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.kills = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.starts += 1
        log = (self.workdir / f"gateway-{self.name}-{self.starts}.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "run",
            env={**os.environ, **self.env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()

    async def healthy(self) -> bool:
        if self.proc is not None and self.proc.returncode is not None:
            raise DrillError(f"gateway {self.name} exited with {self.proc.returncode}; see {self.workdir}")
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{self.url}/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.kills += 1

    async def terminate(self) -> tuple[int, float]:
        """SIGTERM: the gateway drains what is in flight and exits; returns (exit status, seconds)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        status = await self.proc.wait()
        return status, round(time.monotonic() - started, 2)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Rig:
    """Broker, sandbox, store and a gateway process that can be started, killed and started again."""

    def __init__(
        self, workdir: Path, broker: EmbeddedBroker, sandbox: SandboxProcess, n: int, channel: str
    ) -> None:
        self.workdir = workdir
        self.broker = broker
        self.sandbox = sandbox
        self.n = n
        self.channel = channel
        self.private_key, public_key = new_key()
        self.sender = str(demo_advisory()["sender"])
        self.rogue_key, rogue_public = new_key()  # another trusted sender, with no authority over ours
        self.port = free_port()
        self.env = {
            **demo_env(workdir, broker.bootstrap_servers, self.port, sandbox, self.sender, public_key),
            "GATEWAY__PLANNER__CHUNK_SIZE": str(CHUNK),
            "GATEWAY__CHANNELS__PUSH__BURST": str(CHUNK),
            "GATEWAY__CHANNELS__PUSH__TIMEOUT_S": "2.0",
            "GATEWAY__CHANNELS__EMAIL__TIMEOUT_S": "2.0",  # a relay that hangs (outage) costs 2 s
            "GATEWAY__CHANNELS__SMPP__TIMEOUT_S": "2.0",  # likewise an SMSC (a loopback sandbox)
            "GATEWAY__LOGGING__FORMAT": "json",
            # the SMSC sandbox takes far more than the 50 submit_sm/s of the default configuration
            "GATEWAY__CHANNELS__SMPP__RATE_PER_S": "2000",
            "GATEWAY__CHANNELS__SMPP__BURST": str(CHUNK),
            "GATEWAY__CHANNELS__SMS_HTTP__BURST": str(CHUNK),
            "GATEWAY__INTAKE__TRUSTED_KEYS": json.dumps({self.sender: public_key, ROGUE: rogue_public}),
        }
        self.store: Store | None = None
        self._sent_since: tuple[int, float] | None = None  # (sent deliveries, since when): _receipts_settled
        self.gateway = GatewayProcess(self.env, workdir, self.port)

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        return self.gateway.proc

    @property
    def kills(self) -> int:
        return self.gateway.kills

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open(self) -> None:
        csv_path = self.workdir / "recipients.csv"
        only = {"push": "push", "email": "email"}.get(self.channel, "sms")
        await asyncio.to_thread(write_recipients, csv_path, self.n, "XA", 7, only)
        self.store = await Store.open(self.env["GATEWAY__STORE__URL"])
        report = await import_file(self.store, csv_path)
        if report.loaded != self.n:
            raise DrillError(f"imported {report.loaded} of {self.n} recipients")
        await self.sandbox.point_at(self.url)

    async def start_gateway(self) -> None:
        self.gateway.env.update(self.env)  # a drill may have changed a setting since
        await self.gateway.start()
        await self.until(self.gateway.healthy, 60, "the gateway answering /healthz")

    async def kill_gateway(self) -> None:
        await self.gateway.kill()

    async def terminate_gateway(self) -> tuple[int, float]:
        """SIGTERM: the gateway drains what is in flight and exits; returns (exit status, seconds)."""
        return await self.gateway.terminate()

    async def close(self) -> None:
        await self.gateway.stop()
        if self.store is not None:
            await self.store.close()

    def rogue(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` as another trusted sender's (its sender and signature)."""
        return sign({**record, "sender": ROGUE}, self.rogue_key)

    def advisory(self, name: str, **over: Any) -> dict[str, Any]:
        record = demo_advisory()
        record.update(id=f"drill-{name}-{secrets.token_hex(3)}", channels=[self.channel], **over)
        return record

    async def publish(self, record: dict[str, Any]) -> float:
        """Sign and publish; returns the wall-clock time it was on the topic."""
        await publish(self.broker.bootstrap_servers, "advisories", sign(record, self.private_key))
        return time.time()

    async def counted(self, record: dict[str, Any], since: float | None = None) -> dict[str, Any]:
        """What the drill channel's partner counted for this advisory version."""
        stats = await self.sandbox.stats(since)
        key = lifecycle.key(record["id"], record.get("version", 1))
        empty = {"accepted": 0, "unique_recipients": 0, "duplicates": 0, "first_at": None, "last_at": None}
        partner = stats["channels"][self.channel]
        if self.channel == "smpp":
            # an SMSC sees no advisory id (the sandbox files SMS by text): count everything, which is
            # this advisory's in the one-advisory drills (outage, crash) that --channel smpp is for
            return dict(partner)
        counted: dict[str, Any] = partner["by_advisory"].get(key, empty)
        return counted

    async def accepted(self, record: dict[str, Any], at_least: int) -> bool:
        return int((await self.counted(record))["accepted"]) >= at_least

    async def counts(self, advisory_id: str) -> dict[str, int]:
        assert self.store is not None
        return (await self.store.counts(advisory_id)).get(self.channel, {})

    async def settled(self, advisory_id: str, expected: int | None) -> bool:
        """Planned in full (when ``expected`` is given), nothing pending, no receipt outstanding."""
        counts = await self.counts(advisory_id)
        if any(counts.get(s.value) for s in PENDING):
            return False
        if counts.get("sent") and not await self._receipts_settled(counts["sent"]):
            return False
        return expected is None or sum(counts.values()) == expected

    async def _receipts_settled(self, sent: int) -> bool:
        """Whether every receipt the partner will ever send has been sent and taken. HTTP partners
        retry until the gateway takes them, so a `sent` delivery still has one coming. An SMSC writes
        a receipt on a session once: one the gateway took but had not stored when it was killed is
        gone, and its delivery stays `sent` (later `unknown`) — reported as receipts_lost_in_crash.
        Once the SMSC has written them all, the gateway may still be applying the last (or holding
        one for its retry): settled when the `sent` count has then stood still ``RECEIPTS_QUIET_S``."""
        if self.channel in RECEIPTS_RETRIED:
            return False
        partner = (await self.sandbox.stats())["channels"][self.channel]
        if partner["receipts_held"] or partner["receipts_pending"]:
            self._sent_since = None
            return False
        at = time.monotonic()
        if self._sent_since is None or self._sent_since[0] != sent:
            self._sent_since = (sent, at)
            return False
        return at - self._sent_since[1] >= RECEIPTS_QUIET_S

    async def until(self, check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not await check():
            if time.monotonic() > deadline:
                raise DrillError(f"not within {within:.0f}s: {what}")
            await asyncio.sleep(0.1)  # polling another process's state

    async def report(self, record: dict[str, Any], expected: int) -> dict[str, Any]:
        counted = await self.counted(record)
        return {
            "delivered": counted["unique_recipients"],
            "lost": expected - counted["unique_recipients"],
            "duplicates": counted["duplicates"],
            "partner_accepted": counted["accepted"],
            "store": await self.counts(record["id"]),
        }

    async def counters_agree(self) -> bool:
        """The store's delivery counters (what every progress view reads) against a full recount."""
        assert self.store is not None
        return await self.store.progress() == await self.store.recount()


# -- the drills ------------------------------------------------------------------------------------


async def outage(rig: Rig, deadline_s: float) -> dict[str, Any]:
    record = rig.advisory("outage")
    await rig.publish(record)
    await rig.until(lambda: rig.accepted(record, rig.n // 10), deadline_s, "10 % accepted before the outage")
    phases: list[tuple[dict[str, Any], float]] = [
        ({"status": 503}, 5.0),
        ({"status": 429, "retry_after": 1, "count": 20}, 3.0),
        ({"reset": True, "count": 10}, 2.0),
        ({"hang": True, "count": 4}, 3.0),
    ]
    for fault, seconds in phases:
        await rig.sandbox.faults(rig.channel, **fault)
        await asyncio.sleep(seconds)  # the fault lasts this long: a scenario's timeline, not a wait
    await rig.sandbox.faults(rig.channel, count=0)
    recovered = time.time()
    await rig.until(lambda: rig.settled(record["id"], rig.n), deadline_s, "every delivery final")
    report = await rig.report(record, rig.n)
    counted = await rig.counted(record)
    report["faults"] = [f for f, _ in phases]
    report["faults_answered"] = (await rig.sandbox.stats())["channels"][rig.channel]["faulted"]
    report["seconds_from_recovery_to_last_accepted"] = round(counted["last_at"] - recovered, 2)
    report["circuit_opened"] = _log_events(rig.workdir, "channel.circuit_opened")
    return report


async def crash(rig: Rig, deadline_s: float) -> dict[str, Any]:
    record = rig.advisory("crash")
    await rig.publish(record)
    assert rig.store is not None
    store = rig.store

    async def stored() -> bool:
        return await store.advisory_state(record["id"], 1) is not None

    await rig.until(stored, deadline_s, "the advisory stored")
    await rig.kill_gateway()
    planned_at_first_kill = sum((await rig.counts(record["id"])).values())
    await rig.start_gateway()
    for fraction in (0.15, 0.40, 0.70):
        share = int(rig.n * fraction)
        await rig.until(partial(rig.accepted, record, share), deadline_s, f"{fraction:.0%} accepted")
        await rig.kill_gateway()
        await rig.start_gateway()
    await rig.until(partial(rig.accepted, record, int(rig.n * 0.85)), deadline_s, "85 % accepted")
    sigterm_status, sigterm_seconds = await rig.terminate_gateway()
    await rig.start_gateway()
    await rig.until(lambda: rig.settled(record["id"], rig.n), deadline_s, "every delivery final")
    report = await rig.report(record, rig.n)
    report["receipts_lost_in_crash"] = report["store"].get("sent", 0)
    report["kills"] = rig.kills
    report["sigterm_exit_status"] = sigterm_status
    report["sigterm_seconds_to_exit"] = sigterm_seconds
    report["planned_at_first_kill"] = planned_at_first_kill
    return report


async def cancel(rig: Rig, deadline_s: float) -> dict[str, Any]:
    await rig.sandbox.faults(
        rig.channel, latency_s=0.05, count=-1
    )  # a partner slow enough for a cancel to land mid-way
    alert = rig.advisory("cancel")
    await rig.publish(alert)
    await rig.until(lambda: rig.accepted(alert, int(rig.n * 0.3)), deadline_s, "30 % accepted")
    cancel_record = rig.advisory("cancel-of", msg_type="cancel", references=[alert["id"]])
    for key in ("template", "data"):
        cancel_record.pop(key)
    published = await rig.publish(cancel_record)
    assert rig.store is not None
    store = rig.store

    async def applied() -> bool:
        return await store.advisory_state(alert["id"], 1) == AdvisoryState.CANCELLED

    await rig.until(applied, deadline_s, "the cancel applied")
    applied_after = time.time() - published
    await rig.until(lambda: rig.settled(alert["id"], None), deadline_s, "nothing pending, no receipt owed")

    async def in_flight_answered() -> bool:
        """Requests on their way when the cancel landed are answered and recorded as sent."""
        counts = await rig.counts(alert["id"])
        return counts.get("delivered", 0) >= int((await rig.counted(alert))["accepted"])

    with contextlib.suppress(DrillError):  # if it never catches up, "lost" below says by how much
        await rig.until(in_flight_answered, 30, "the store agreeing with the partner")
    counted = await rig.counted(alert, since=published + 1.0)
    right_after = await rig.counted(alert, since=published)
    store_counts = await rig.counts(alert["id"])
    sent = store_counts.get("delivered", 0) + store_counts.get("sent", 0) + store_counts.get("unknown", 0)
    return {
        "delivered": counted["unique_recipients"],
        "lost": max(0, sent - counted["unique_recipients"]),
        "duplicates": counted["duplicates"],
        "sent_after_cancel": counted["accepted_since"],
        "accepted_within_the_second_after_cancel": right_after["accepted_since"] - counted["accepted_since"],
        "cancel_seen_after_s": round(applied_after, 3),
        "cancelled": store_counts.get("cancelled", 0),
        "never_planned": rig.n - sum(store_counts.values()),
        "store": store_counts,
    }


async def priority(rig: Rig, deadline_s: float) -> dict[str, Any]:
    await rig.sandbox.faults(rig.channel, latency_s=0.1, count=-1)  # a slow partner: the bulk takes a while
    bulk = rig.advisory("bulk", severity="minor", urgency="expected")
    await rig.publish(bulk)
    await rig.until(lambda: rig.accepted(bulk, rig.n // 10), deadline_s, "the bulk 10 % accepted")
    urgent = rig.advisory("urgent", severity="extreme", urgency="immediate")
    published = await rig.publish(urgent)
    await rig.until(lambda: rig.accepted(urgent, rig.n), deadline_s, "the urgent advisory accepted by all")
    bulk_when_urgent_done = (await rig.counted(bulk))["accepted"]
    await rig.until(lambda: rig.settled(bulk["id"], rig.n), deadline_s, "the bulk advisory final")
    await rig.until(lambda: rig.settled(urgent["id"], rig.n), deadline_s, "the urgent advisory final")
    u, b = await rig.report(urgent, rig.n), await rig.report(bulk, rig.n)
    cu, cb = await rig.counted(urgent), await rig.counted(bulk)
    return {
        "delivered": u["delivered"] + b["delivered"],
        "lost": u["lost"] + b["lost"],
        "duplicates": u["duplicates"] + b["duplicates"],
        "urgent_seconds_to_first_partner_request": round(cu["first_at"] - published, 3),
        "urgent_seconds_to_all_accepted": round(cu["last_at"] - published, 3),
        "bulk_accepted_when_urgent_done": bulk_when_urgent_done,
        "bulk_seconds_to_all_accepted_after_urgent_published": round(cb["last_at"] - published, 3),
        "urgent": u,
        "bulk": b,
    }


def _log_events(workdir: Path, event: str) -> int:
    """How many times the gateway processes logged ``event`` (their JSON logs in the drill folder)."""
    count = 0
    for path in sorted(workdir.glob("gateway-*.log")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("event") == event:
                    count += 1
    return count


async def poison(rig: Rig, deadline_s: float) -> dict[str, Any]:
    """Every bad record of gateway/poison.py on the topic, then a good advisory (then the cancel and
    update of it by a sender without authority): each bad one dead-lettered with its kind, the good
    one delivered to everyone once, and intake never idle while a record waited."""
    good = rig.advisory("poison")
    bad = corpus(good, partial(sign, private_key_b64=rig.private_key), _forge, rig.rogue)
    published: dict[tuple[int, int], tuple[str, float]] = {}  # (partition, offset) -> (name, at)
    producer = kafka.producer(rig.broker.bootstrap_servers)
    await producer.start()
    try:

        async def put(name: str, raw: bytes, key: str) -> None:
            meta = await producer.send_and_wait("advisories", raw, key=key.encode())
            published[(meta.partition, meta.offset)] = (name, time.time())

        for p in bad:
            if not p.after_good:
                await put(p.name, p.raw, p.name)
        good_signed = sign(good, rig.private_key)
        await put("good", json.dumps(good_signed, ensure_ascii=False).encode(), good["id"])
        assert rig.store is not None
        store = rig.store

        async def good_stored() -> bool:
            return await store.advisory_state(good["id"], 1) is not None

        await rig.until(good_stored, deadline_s, "the good advisory stored")
        for p in bad:
            if p.after_good:
                await put(p.name, p.raw, good["id"])  # keyed as a real cancel or update would be
    finally:
        await producer.stop()
    dead = await _read_dlq(rig, len(bad), deadline_s)
    await rig.until(lambda: rig.settled(good["id"], rig.n), deadline_s, "the good advisory final")
    consumed = {source: at for source, (_, at) in dead.items()}
    good_at = await store.received_at(good["id"], 1)
    good_source = next(src for src, (name, _) in published.items() if name == "good")
    if good_at is not None:
        consumed[good_source] = good_at
    expected = {p.name: p.expected for p in bad}
    got = {published[src][0]: kind for src, (kind, _) in dead.items() if src in published}
    wrong = {
        name: {"expected": kind, "got": got.get(name)}
        for name, kind in expected.items()
        if got.get(name) != kind
    }
    by_kind: dict[str, int] = {}
    for kind, _ in dead.values():
        by_kind[kind] = by_kind.get(kind, 0) + 1
    report = await rig.report(good, rig.n)
    return {
        "records": len(bad) + 1,
        "dead_lettered": by_kind,
        "not_dead_lettered_as_expected": wrong,
        "intake_stalled_s": _longest_stall(published, consumed),
        "good_delivered": report["delivered"],
        "lost": report["lost"],
        "duplicates": report["duplicates"],
        "store": report["store"],
        **({"error": f"{len(wrong)} records not dead-lettered as expected"} if wrong else {}),
    }


STALL_LIMIT_S = 5.0


def _longest_stall(
    published: dict[tuple[int, int], tuple[str, float]], consumed: dict[tuple[int, int], float]
) -> float:
    """The longest time intake spent on one record: from when it could be taken (published, and
    the record before it done) to when it was done (dead-lettered or stored). A record never
    consumed counts to now."""
    stall = 0.0
    previous = 0.0
    now_ = time.time()
    for src, (_, at) in sorted(published.items(), key=lambda kv: kv[1][1]):
        done = consumed.get(src, now_)
        stall = max(stall, done - max(at, previous))
        previous = max(previous, done)
    return round(stall, 2)


async def _read_dlq(rig: Rig, count: int, deadline_s: float) -> dict[tuple[int, int], tuple[str, float]]:
    """The dead-letter topic's records: source (partition, offset) -> (error kind, when written)."""
    consumer = AIOKafkaConsumer(
        "advisories.dlq",
        bootstrap_servers=rig.broker.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: dict[tuple[int, int], tuple[str, float]] = {}
    try:
        deadline = time.monotonic() + deadline_s
        while len(out) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    headers = {k: v.decode() for k, v in r.headers}
                    _, partition, offset = headers["source"].rsplit("/", 2)
                    out[(int(partition), int(offset))] = (headers["error"], r.timestamp / 1000)
    finally:
        await consumer.stop()
    return out


def _forge(record: dict[str, Any]) -> dict[str, Any]:
    return sign(record, new_key()[0])


RUNNERS: dict[str, Callable[[Rig, float], Awaitable[dict[str, Any]]]] = {
    "outage": outage,
    "crash": crash,
    "cancel": cancel,
    "priority": priority,
    "poison": poison,
}


# drills that count what the partner took per advisory: the sandbox SMSC cannot (it files SMS by text)
PER_ADVISORY = frozenset({"cancel", "priority"})


async def run_drill(name: str, n: int, deadline_s: float, channel: str = "push") -> dict[str, Any]:
    """Run one drill from nothing; the report, with ``passed`` and (if it broke off) ``error``."""
    if channel == "smpp" and name in PER_ADVISORY:
        why = f"drill {name} counts per advisory, which the sandbox SMSC cannot; use push, sms-http or email"
        return {"drill": name, "channel": channel, "recipients": n, "error": why, "passed": False}
    workdir = Path(tempfile.mkdtemp(prefix=f"gateway-drill-{name}-"))
    started = time.monotonic()
    report: dict[str, Any] = {"drill": name, "channel": channel, "recipients": n, "workdir": str(workdir)}
    async with (
        EmbeddedBroker() as broker,
        SandboxProcess(secrets.token_urlsafe(32), receipt_delay_s=0.2) as sb,
    ):
        rig = Rig(workdir, broker, sb, n, channel)
        try:
            await rig.open()
            await rig.start_gateway()
            report.update(await RUNNERS[name](rig, deadline_s))
            report["counters_agree"] = await rig.counters_agree()
        except DrillError as e:
            report["error"] = str(e)
        finally:
            await rig.close()
    report["seconds"] = round(time.monotonic() - started, 1)
    must_be_zero = ["lost", "sent_after_cancel"]
    if channel in IDEMPOTENT:
        must_be_zero.append("duplicates")
    else:  # SMPP and SMTP have no idempotency key: a crash may resend what was in flight, reported
        report["duplicates_bound"] = _duplicates_bound(rig)
        if report.get("duplicates", 0) > report["duplicates_bound"]:
            report["error"] = "more duplicates than the in-flight bound"
    if report.get("intake_stalled_s", 0) > STALL_LIMIT_S:
        report["error"] = (
            f"intake stalled {report['intake_stalled_s']} s on one record (limit {STALL_LIMIT_S})"
        )
    if report.get("counters_agree") is False:
        report["error"] = "the delivery counters disagree with a recount of the deliveries"
    report["passed"] = "error" not in report and all(report.get(k, 0) == 0 for k in must_be_zero)
    return report


IDEMPOTENT = frozenset({"push", "sms-http"})  # partners that honour our idempotency key
RECEIPTS_RETRIED = frozenset({"push", "sms-http", "email"})  # webhooks: a receipt comes until taken


def _duplicates_bound(rig: Rig) -> int:
    """What a crash may resend without an idempotency key: per kill, every message that may have
    reached the partner with its result not yet recorded (``Adapter.unrecorded_bound``)."""
    from channels import registry
    from channels.base import load_settings as channel_settings
    from gateway.settings import load_settings

    raw = load_settings(environ={**os.environ, **rig.env}).channels[rig.channel]
    cls = registry.adapter_class(str(raw.get("adapter", rig.channel)))
    s = channel_settings(cls.settings_model, rig.channel, raw)
    return max(1, rig.kills) * cls.unrecorded_bound(s)


def main(name: str, n: int, as_json: bool, deadline_s: float, channel: str = "push") -> int:
    gw_logging.configure("warning", "auto")
    report = asyncio.run(run_drill(name, n, deadline_s, channel))
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        for key, value in report.items():
            sys.stdout.write(f"{key:>48}: {value}\n")
    return 0 if report["passed"] else 1
