"""``broadcast-gateway bench``: how fast one broadcast goes, beside the floor and beside Apprise.

One run sets up what the drills do — the embedded broker, the sandbox partners in their own process,
a SQLite store in a temporary folder, N recipients all on one channel — and measures, in this order:

1. **the floor**: a minimal client posting the same messages to the same sandbox partner, in the
   partner's largest batches (push, sms-http: signed JSON batches; e-mail: SMTP over as many
   connections as the gateway's pool, envelopes pipelined as the adapter sends them), as many
   requests open at once as the gateway's adapter allows. Nothing is stored, rendered or retried:
   what the partner and the loopback cost.
2. **Apprise** (when installed; ``--apprise 0`` leaves it out): the same per-message notifications
   through its ``json://`` plugin to the same partner (its ``/apprise/<channel>`` sink), up to
   ``--apprise`` messages (Apprise sends one HTTP request per message; its rate is projected to N).
3. **the gateway** as its own process (``broadcast-gateway run``), the partner's rate limit lifted:
   the advisory is published on Kafka and followed to the end. With ``--urgent K``, K urgent
   advisories (100 recipients each, elsewhere) are published one every 0.5 s from the bulk's start.

Reported: time to all-sent (the partner's last acceptance) and all-delivered (every delivery final in
the store), deliveries/s over time, dispatch latency p50/p99 (the gateway's own histogram), the
urgent advisories' first partner request after publishing (p50/p99/max), peak RSS and CPU seconds
of each process (broker, sandbox, gateway, this process), the partner's duplicates, and the ratios
gateway/floor and Apprise/floor. ``--chart FILE`` draws deliveries/s and the gateway's RSS over
time (matplotlib); ``--profile FILE`` samples the gateway with py-spy during the broadcast and
reports where its time went (collapsed stacks kept in FILE).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import orjson
import sqlalchemy as sa
from aiosmtplib.email import flatten_message
from prometheus_client.parser import text_string_to_metric_families

from channels.base import hmac_headers
from channels.email import UNDISCLOSED, EmailSettings, mime
from channels.smtp_pipelining import Relay, make_envelope
from gateway import logging as gw_logging
from gateway.auth import Tokens
from gateway.broker import EmbeddedBroker, free_port
from gateway.demo import write_recipients
from gateway.directory import import_file
from gateway.drill import DrillError, GatewayProcess, Rig
from gateway.models import FINAL, PENDING
from gateway.sandbox.process import SandboxProcess
from gateway.schema import delivery_events
from gateway.trends import bucket, quantile

CHANNELS = ("push", "sms-http", "email", "smpp")
URGENT_AUDIENCE = 100
URGENT_COUNTRY = "XU"
URGENT_EVERY_S = 0.5  # --urgent K: one urgent advisory every this many seconds from the bulk's start
TITLE = "Evacuation advisory: Arvenia"
BODY = (
    "Leave Arvenia now by an open crossing: North Gate to Belmora (24/7), River Bridge to Calden "
    "(06:00-22:00). Hotline +7 7172 00 00 00. Updates: https://mfa.example/arvenia"
)
# what the gateway's adapter is allowed for each channel in the bench (the partner's limit lifted)
LIFTED = {
    "push": {"RATE_PER_S": "1000000", "BURST": "500"},
    "sms-http": {"RATE_PER_S": "1000000", "BURST": "100"},
    "email": {"RATE_PER_S": "1000000", "BURST": "50"},
    "smpp": {"RATE_PER_S": "1000000", "BURST": "50"},
}
BATCH = {"push": 500, "sms-http": 100, "email": 50, "smpp": 50}
IN_FLIGHT = 4  # the adapters' default max_in_flight; e-mail: its pool_size (4)
RECIPIENTS_PER_MESSAGE = EmailSettings.model_fields["recipients_per_message"].default  # the adapter's


# -- processes ------------------------------------------------------------------------------------


@dataclass
class ProcStat:
    rss: int = 0  # bytes now
    peak_rss: int = 0  # bytes, the kernel's high-water mark (VmHWM)
    cpu_s: float = 0.0


def proc_stat(pid: int, children: bool = True) -> ProcStat | None:
    """RSS, peak RSS and CPU seconds of ``pid`` and (``children``) its children (None once it is gone)."""
    pids = [pid, *_children(pid)] if children else [pid]
    out = ProcStat()
    found = False
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        found = True
        fields = {k: v for k, _, v in (line.partition(":") for line in status.splitlines())}
        out.rss += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        out.peak_rss += int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
        ticks = stat.rsplit(")", 1)[1].split()
        out.cpu_s += (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
    return out if found else None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += [int(child), *_children(int(child))]
    return out


class Watch:
    """Samples the processes now and then; keeps each one's last reading (peaks are the kernel's)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.last: dict[str, ProcStat] = {}
        self.series: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}

    def sample(self, t: float) -> None:
        for name, pid in self.pids.items():
            s = proc_stat(pid, children=pid != os.getpid())  # this process: not the ones it started
            if s is not None:
                self.last[name] = s
                self.series[name].append((t, s.rss))

    def report(self) -> dict[str, dict[str, float]]:
        return {
            name: {"peak_rss_mb": round(s.peak_rss / 2**20, 1), "cpu_s": round(s.cpu_s, 2)}
            for name, s in self.last.items()
        }


# -- the floor and Apprise ------------------------------------------------------------------------


def _user(channel: str, i: int) -> dict[str, str]:
    """The address of recipient ``i`` on ``channel``, as gateway.demo.write_recipients made it."""
    if channel == "push":
        return {"user_ref": f"app-r{i:07d}"}
    if channel in ("sms-http", "smpp"):
        return {"to": f"+7701{i:07d}"}
    return {"email": f"citizen{i}@example.kz"}


def _message(channel: str, advisory: str, i: int) -> dict[str, Any]:
    key = f"{advisory}/{i}"
    if channel == "push":
        return {
            "idempotency_key": key,
            **_user(channel, i),
            "title": TITLE,
            "body": BODY,
            "language": "en",
            "priority": "normal",
            "advisory_id": advisory,
            "advisory_version": 1,
        }
    return {
        "reference": key,
        **_user(channel, i),
        "text": BODY,
        "encoding": "gsm7",
        "sender": "MFA",
        "language": "en",
        "advisory_id": advisory,
        "advisory_version": 1,
    }


async def floor(sandbox: SandboxProcess, channel: str, n: int) -> dict[str, Any]:
    """The same messages straight to the partner; seconds and messages/s (None for SMPP)."""
    advisory = f"floor-{secrets.token_hex(3)}"
    assert sandbox.pid is not None
    cpu_before = (proc_stat(sandbox.pid) or ProcStat()).cpu_s
    started = time.monotonic()
    if channel in ("push", "sms-http"):
        await _floor_http(sandbox, channel, advisory, n)
    elif channel == "email":
        await _floor_smtp(sandbox, advisory, n)
    else:
        return {"seconds": None, "per_s": None, "why": "no floor client for SMPP: measured at its window"}
    seconds = time.monotonic() - started
    sandbox_cpu = (proc_stat(sandbox.pid) or ProcStat()).cpu_s - cpu_before
    counted = (await sandbox.stats())["channels"][channel]["by_advisory"].get(f"{advisory}@v1", {})
    return {
        "seconds": round(seconds, 2),
        "per_s": round(n / seconds),
        "sandbox_cpu_s": round(sandbox_cpu, 2),
        "accepted": counted.get("accepted", 0),
        "duplicates": counted.get("duplicates", 0),
    }


async def _floor_http(sandbox: SandboxProcess, channel: str, advisory: str, n: int) -> None:
    path = "/v1/messages:batch" if channel == "push" else "/sms/v1/messages"
    url = sandbox.url + path
    batch = BATCH[channel]
    starts = iter(range(0, n, batch))

    async def client(http: aiohttp.ClientSession) -> None:
        for start in starts:
            messages = [_message(channel, advisory, i) for i in range(start, min(start + batch, n))]
            body = orjson.dumps({"messages": messages})  # as the adapters encode (channels/base.py)
            headers = {"Content-Type": "application/json", **hmac_headers(sandbox.secret, body)}
            async with http.post(url, data=body, headers=headers) as resp:
                resp.raise_for_status()
                results = orjson.loads(await resp.read())["results"]
                if len(results) != len(messages):
                    raise DrillError(f"floor: {len(results)} results for {len(messages)} messages")

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http) for _ in range(IN_FLIGHT)))


async def _floor_smtp(sandbox: SandboxProcess, advisory: str, n: int) -> None:
    # as the adapter sends (channels/email.py): one message for up to RECIPIENTS_PER_MESSAGE of one
    # rendering, To undisclosed, each recipient an RCPT of the same transaction, the envelope
    # pipelined (the sandbox relay announces PIPELINING) through the adapter's own connection
    starts = iter(range(0, n, RECIPIENTS_PER_MESSAGE))

    async def connection() -> None:
        relay = Relay(aiosmtplib.SMTP(hostname="127.0.0.1", port=sandbox.smtp_port), None, None, 60.0)
        try:
            for start in starts:
                numbers = range(start, min(start + RECIPIENTS_PER_MESSAGE, n))
                headers = {
                    "From": "alerts@mfa.example",
                    "To": UNDISCLOSED,
                    "Subject": TITLE,
                    "X-Advisory": f"{advisory}@v1",
                    "Content-Language": "en",
                    "Message-ID": f"<{advisory}.{start}@bench.invalid>",
                }
                raw = flatten_message(mime(headers, BODY))  # built as the adapter builds it
                addresses = [_user("email", i)["email"] for i in numbers]
                await relay.send(make_envelope(headers["From"], addresses, raw))
        finally:
            await relay.quit()

    await asyncio.gather(*(connection() for _ in range(IN_FLIGHT)))


async def apprise_run(sandbox: SandboxProcess, channel: str, n: int, limit: int) -> dict[str, Any]:
    """Up to ``limit`` of the same per-message notifications through Apprise's json:// plugin."""
    base = f"json://127.0.0.1:{sandbox.port}/apprise/{channel}"
    try:
        with warnings.catch_warnings():  # apprise 2.x loads plugins importing imghdr (deprecated)
            warnings.simplefilter("ignore", DeprecationWarning)
            import apprise

            apprise.Apprise().add(base)  # its plugins load on the first URL: before the clock starts
    except ImportError:
        return {"seconds": None, "per_s": None, "why": "apprise is not installed (pip install apprise)"}
    count = min(n, limit)
    advisory = f"apprise-{secrets.token_hex(3)}"
    numbers = iter(range(count))
    failed = 0

    async def sender() -> None:
        nonlocal failed
        for i in numbers:
            extras = {"idempotency_key": f"{advisory}/{i}", "advisory": f"{advisory}@v1", **_user(channel, i)}
            url = base + "?" + "&".join(f":{k}={v}" for k, v in extras.items())
            notifier = apprise.Apprise()
            notifier.add(url)
            if not await notifier.async_notify(body=BODY, title=TITLE):
                failed += 1

    started = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(IN_FLIGHT)))
    seconds = time.monotonic() - started
    counted = (await sandbox.stats())["channels"][channel]["by_advisory"].get(f"{advisory}@v1", {})
    return {
        "messages": count,
        "seconds": round(seconds, 2),
        "per_s": round(count / seconds),
        "projected_seconds": round(n * seconds / count, 1),
        "accepted": counted.get("accepted", 0),
        "failed": failed,
    }


# -- the gateway ----------------------------------------------------------------------------------


@dataclass
class Timeline:
    at: list[float] = field(default_factory=list)  # seconds since publishing
    sent: list[int] = field(default_factory=list)  # deliveries sent or further
    final: list[int] = field(default_factory=list)  # deliveries final (delivered, read, failed, …)
    rss: list[int] = field(default_factory=list)  # gateway RSS, bytes

    def rates(self, every_s: float = 1.0) -> list[tuple[float, float, float]]:
        """(time, sent/s, final/s) over windows of about ``every_s``."""
        out = []
        last = 0
        for i in range(1, len(self.at)):
            if self.at[i] - self.at[last] >= every_s or i == len(self.at) - 1:
                dt = self.at[i] - self.at[last]
                if dt > 0:
                    out.append(
                        (
                            self.at[i],
                            (self.sent[i] - self.sent[last]) / dt,
                            (self.final[i] - self.final[last]) / dt,
                        )
                    )
                last = i
        return out


async def dispatch_latency(rig: Rig, channel: str) -> dict[str, Any]:
    """p50/p99 of the gateway's own dispatch latency histogram (stored → sent), from /metrics, each
    with the bucket it falls in (the value is interpolated inside the bucket)."""
    assert rig.store is not None
    _, token = await Tokens(rig.store).create("bench", ["operator"], actor="bench")
    async with (
        aiohttp.ClientSession() as http,
        http.get(rig.url + "/metrics", headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        resp.raise_for_status()
        text = await resp.text()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "gateway_dispatch_latency_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_bucket") and s.labels.get("channel") == channel:
                buckets[float(s.labels["le"])] = s.value
    out: dict[str, Any] = {}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        value = quantile(q, buckets)
        out[f"{name}_s"] = None if value is None else round(value, 3)
        # the value is interpolated inside this bucket, so past 120 s (buckets 120, 300, 600) it says
        # little: a million's p99 read 534 s with every message sent within 316 s
        out[f"{name}_bucket_s"] = bucket(q, buckets)
    return out


class Profiler:
    """py-spy sampling the gateway process (raw collapsed stacks, thread names kept)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, pid: int) -> None:
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if spy is None:
            raise DrillError("--profile needs py-spy (pip install py-spy)")
        self._proc = await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "100",
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "--output",
            str(self.path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def stop(self) -> dict[str, Any]:
        if self._proc is None:
            return {}
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(2)  # SIGINT: py-spy writes what it sampled
        await self._proc.wait()
        return await asyncio.to_thread(summarize_profile, self.path)


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Shares of samples by thread and the functions most often at the top of the stack."""
    threads: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    owners: Counter[str] = Counter()  # the innermost frame of the project's own code
    total = 0
    if not path.exists():
        return {"error": "py-spy wrote nothing"}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        # "thread (6008): MainThread;frame;frame": the thread's name, then its stack
        threads[frames[0].partition(": ")[2] or "?"] += n
        leaves[_frame(frames[-1])] += n
        own = next((f for f in reversed(frames) if _OWN.search(f)), None)
        owners[_frame(own) if own else "(outside the project)"] += n

    def shares(c: Counter[str]) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in c.most_common(top)}

    return {
        "samples": total,
        "threads_pct": shares(threads),
        "leaf_functions_pct": shares(leaves),
        "own_code_pct": shares(owners),
    }


_OWN = re.compile(r"\((?:.*/)?(?:gateway|channels)/[^/]+\.py:")


def _frame(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    file = where.split(":")[0].rsplit("/", 1)[-1]
    return f"{name} ({file})" if file else name


async def run_bench(
    n: int,
    channel: str,
    deadline_s: float,
    apprise_limit: int,
    urgent: int,
    chart: Path | None,
    profile: Path | None,
    skip_floor: bool = False,
    floor_only: bool = False,
    planner_process: bool = False,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    report: dict[str, Any] = {"channel": channel, "recipients": n, "workdir": str(workdir)}
    started = time.monotonic()
    async with (
        EmbeddedBroker() as broker,
        SandboxProcess(secrets.token_urlsafe(32), receipt_delay_s=0.2) as sandbox,
    ):
        rig = Rig(workdir, broker, sandbox, n, channel)
        env = channel.upper().replace("-", "_")
        rig.env.update({f"GATEWAY__CHANNELS__{env}__{k}": v for k, v in LIFTED[channel].items()})
        rig.env["GATEWAY__PLANNER__CHUNK_SIZE"] = "500"
        try:
            t = time.monotonic()
            await rig.open()
            if urgent:
                await _urgent_audience(rig)
            report["setup_s"] = round(time.monotonic() - t, 1)
            await sandbox.configure(channel, receipts=False)  # the floor's and Apprise's: to no one
            report["floor"] = (
                {"seconds": None, "per_s": None} if skip_floor else await floor(sandbox, channel, n)
            )
            if not floor_only:
                report["apprise"] = (
                    await apprise_run(sandbox, channel, n, apprise_limit)
                    if apprise_limit
                    else {"seconds": None, "per_s": None, "why": "--apprise 0"}
                )
                await sandbox.configure(channel, receipts=True)
                planner = _planner(rig) if planner_process else None
                try:
                    await _measure_gateway(rig, report, deadline_s, urgent, chart, profile, planner)
                finally:
                    if planner is not None and planner.proc is not None and planner.proc.returncode is None:
                        await planner.kill()
        except DrillError as e:
            report["error"] = str(e)
        finally:
            await rig.close()
    g, f, a = report.get("gateway", {}), report.get("floor", {}), report.get("apprise", {})
    if g.get("all_sent_s") and f.get("seconds"):
        report["gateway_over_floor"] = round(g["all_sent_s"] / f["seconds"], 2)
    if a.get("projected_seconds") and f.get("seconds"):
        report["apprise_over_floor"] = round(a["projected_seconds"] / f["seconds"], 2)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def _planner(rig: Rig) -> GatewayProcess:
    """A second gateway process that only plans (roles: intake): the measured one then dispatches and
    takes the receipts, each process with its own interpreter lock, both on the one SQLite file."""
    rig.env["GATEWAY__GATEWAY__ROLES"] = "[dispatch,receipts]"
    env = {**rig.env, "GATEWAY__GATEWAY__ROLES": "[intake]"}
    return GatewayProcess(env, rig.workdir, free_port(), name="planner")


async def _measure_gateway(
    rig: Rig,
    report: dict[str, Any],
    deadline_s: float,
    urgent: int,
    chart: Path | None,
    profile: Path | None,
    planner: GatewayProcess | None = None,
) -> None:
    await rig.start_gateway()
    pids = {"gateway": rig.proc.pid if rig.proc else 0}
    if planner is not None:
        await planner.start()
        await rig.until(planner.healthy, 60, "the planning gateway answering /healthz")
        assert planner.proc is not None
        pids["planner"] = planner.proc.pid
    assert rig.proc is not None
    assert rig.sandbox.pid is not None
    assert rig.broker.pid is not None
    watch = Watch({**pids, "sandbox": rig.sandbox.pid, "broker": rig.broker.pid, "bench": os.getpid()})
    profiler = Profiler(profile) if profile else None
    if profiler is not None:
        await profiler.start(rig.proc.pid)
    report["gateway"] = await _broadcast(rig, watch, deadline_s, urgent)
    if profiler is not None:
        report["profile"] = await profiler.stop()
    report["gateway"]["dispatch_latency"] = await dispatch_latency(rig, rig.channel)
    report["processes"] = watch.report()
    report["counters_agree"] = await rig.counters_agree()
    timeline = report["gateway"].pop("timeline")
    if chart is not None:
        draw(chart, report, timeline, rig.n)
        report["chart"] = str(chart)


async def _urgent_audience(rig: Rig) -> None:
    assert rig.store is not None
    path = rig.workdir / "urgent.csv"
    only = {"push": "push", "email": "email"}.get(rig.channel, "sms")
    await asyncio.to_thread(write_recipients, path, URGENT_AUDIENCE, URGENT_COUNTRY, 11, only, rig.n)
    await import_file(rig.store, path)


async def _events_waiting(rig: Rig) -> int:
    assert rig.store is not None
    async with rig.store.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(delivery_events))).scalar_one())


async def _broadcast(rig: Rig, watch: Watch, deadline_s: float, urgent: int) -> dict[str, Any]:
    record = rig.advisory("bench", severity="severe", urgency="expected")
    published = await rig.publish(record)
    t0 = time.monotonic()
    timeline = Timeline()
    pending = {s.value for s in PENDING}
    final = {s.value for s in FINAL}
    urgents: list[tuple[dict[str, Any], float]] = []
    during_bulk = 0  # urgent advisories published while the bulk one was not all sent
    all_final_s: float | None = None
    events_waiting = 0
    while time.monotonic() - t0 < deadline_s:
        counts = await rig.counts(record["id"])
        t = time.monotonic() - t0
        watch.sample(t)
        timeline.at.append(t)
        timeline.sent.append(sum(v for s, v in counts.items() if s not in pending))
        timeline.final.append(sum(v for s, v in counts.items() if s in final))
        timeline.rss.append(watch.last["gateway"].rss if "gateway" in watch.last else 0)
        if len(urgents) < urgent and t >= URGENT_EVERY_S * (len(urgents) + 1):
            u = rig.advisory(f"urgent{len(urgents)}", severity="extreme", urgency="immediate")
            u["audience"] = {"countries": [URGENT_COUNTRY]}
            urgents.append((u, await rig.publish(u)))
            during_bulk += timeline.sent[-1] < rig.n
        if all_final_s is None and timeline.final[-1] >= rig.n and sum(counts.values()) >= rig.n:
            all_final_s = t
            events_waiting = await _events_waiting(rig)
        if all_final_s is not None and len(urgents) == urgent:
            break
        await asyncio.sleep(0.2)  # sampling another process's progress
    if all_final_s is None:
        raise DrillError(f"not all final within {deadline_s:.0f}s (final: {timeline.final[-1:]})")
    counted = await rig.counted(record)
    firsts = []
    for u, at in urgents:
        await rig.until(partial(rig.accepted, u, URGENT_AUDIENCE), deadline_s, f"{u['id']} accepted")
        c = await rig.counted(u)
        firsts.append(c["first_at"] - at)
    out: dict[str, Any] = {
        "all_sent_s": round(counted["last_at"] - published, 2) if counted.get("last_at") else None,
        "all_delivered_s": round(all_final_s, 2),
        "per_s": round(rig.n / (counted["last_at"] - published)) if counted.get("last_at") else None,
        "partner_accepted": counted["accepted"],
        "partner_unique": counted["unique_recipients"],
        "duplicates": counted["duplicates"],
        "lost": rig.n - counted["unique_recipients"],
        "store": await rig.counts(record["id"]),
        # delivery events still in the outbox when every delivery was final: work the publisher had
        # not done yet (docs/delivery-events.md, "Latency")
        "events_waiting_at_all_delivered": events_waiting,
        "timeline": timeline,
    }
    if urgent:
        out["urgent"] = {
            "published": len(urgents),
            "published_during_bulk": during_bulk,
            "reached_partner": len(firsts),
            "first_request_p50_s": round(statistics.median(firsts), 3) if firsts else None,
            "first_request_p99_s": round(_p(firsts, 0.99), 3) if firsts else None,
            "first_request_max_s": round(max(firsts), 3) if firsts else None,
        }
    return out


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def draw(path: Path, report: dict[str, Any], timeline: Timeline, n: int) -> None:
    """Deliveries/s over time (sent, final) with the floor's rate, and the gateway's RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = timeline.rates()
    fig, (ax, ax_rss) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 1])
    ax.plot([r[0] for r in rates], [r[1] for r in rates], label="sent/s (gateway)")
    ax.plot([r[0] for r in rates], [r[2] for r in rates], label="final/s (delivered, failed)", alpha=0.7)
    floor_rate = report.get("floor", {}).get("per_s")
    if floor_rate:
        ax.axhline(floor_rate, color="grey", linestyle="--", label=f"floor {floor_rate:,}/s")
    apprise_rate = report.get("apprise", {}).get("per_s")
    if apprise_rate:
        ax.axhline(apprise_rate, color="red", linestyle=":", label=f"Apprise {apprise_rate:,}/s")
    ax.set_yscale("log")  # the floor, the gateway and Apprise differ by orders of magnitude
    ax.set_ylabel("deliveries / s (log scale)")
    ax.set_title(f"broadcast-gateway bench: {n:,} recipients, {report['channel']}")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax_rss.plot(timeline.at, [r / 2**20 for r in timeline.rss], color="purple")
    ax_rss.set_ylabel("gateway RSS, MB")
    ax_rss.set_xlabel("seconds since the advisory was published")
    ax_rss.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    n: int,
    channel: str,
    as_json: bool,
    deadline_s: float,
    apprise_limit: int,
    urgent: int,
    chart: str | None,
    profile: str | None,
    skip_floor: bool = False,
    floor_only: bool = False,
    planner_process: bool = False,
) -> int:
    gw_logging.configure("warning", "auto")
    report = asyncio.run(
        run_bench(
            n,
            channel,
            deadline_s,
            apprise_limit,
            urgent,
            Path(chart) if chart else None,
            Path(profile) if profile else None,
            skip_floor,
            floor_only,
            planner_process,
        )
    )
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        for key, value in report.items():
            sys.stdout.write(f"{key:>20}: {value}\n")
    return 1 if "error" in report else 0
