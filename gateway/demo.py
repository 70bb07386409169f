"""``broadcast-gateway demo``: the whole house on one machine, in one command.

Embedded broker, SQLite in a temporary folder, the sandbox partner as its own process, the gateway
in this process; a generated directory (kk, ru, en) streamed to CSV and imported; then the press
office's way in: the demo makes two API tokens, submits the evacuation advisory over HTTP with the
press token (the gateway signs it with the sender's key), and approves it with the second person's
token (the approval policy of the production profile: every advisory); live progress until every
delivery is final; then a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from gateway import logging as gw_logging
from gateway.app import Gateway
from gateway.broker import EmbeddedBroker, free_port
from gateway.directory import import_file
from gateway.models import FINAL, PENDING, Status, now
from gateway.progress import table
from gateway.sandbox.process import SandboxProcess
from gateway.settings import PROJECT_ROOT, Settings, load_settings
from gateway.signing import new_key
from gateway.store import Store

DEMO_ADVISORY = PROJECT_ROOT / "config" / "demo-advisory.yaml"
FIELDS = ["id", "languages", "phone", "email", "app_user", "country", "region", "tags", "opt_outs"]
LANGUAGE_CHAINS = [("kk|ru", 30), ("kk", 15), ("ru", 40), ("en", 10), ("de|en", 5)]


def write_recipients(
    path: Path, n: int, country: str, seed: int = 7, only: str | None = None, first: int = 0
) -> None:
    """A synthetic directory of ``n`` recipients, written row by row (never held in memory);
    ``only`` ("push", "sms" or "email"): every one reachable there and nowhere else (the drills
    count one channel); numbered from ``first`` (ids, phones and addresses follow the number)."""
    rng = random.Random(seed)
    chains, weights = zip(*LANGUAGE_CHAINS, strict=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for i in range(first, first + n):
            rid = f"r{i:07d}"
            reach = rng.random()  # 60 % on the super-app, 25 % phone only, 15 % e-mail only
            on_app = reach < 0.60 if only is None else only == "push"
            has_phone = reach < 0.85 if only is None else only == "sms"
            has_email = (reach >= 0.85 or rng.random() < 0.5) if only is None else only == "email"
            w.writerow(
                [
                    rid,
                    rng.choices(chains, weights)[0],
                    f"+7701{i:07d}" if has_phone else "",  # unique: two citizens never share a number here
                    f"citizen{i}@example.kz" if has_email else "",
                    f"app-{rid}" if on_app else "",
                    country,
                    rng.choice(["capital", "north", "south"]),
                    "registered" if rng.random() < 0.8 else "registered|consular-list",
                    "",
                ]
            )


def demo_advisory() -> dict[str, Any]:
    record: dict[str, Any] = yaml.safe_load(DEMO_ADVISORY.read_text(encoding="utf-8"))
    issued = now()
    record["issued_at"] = issued.isoformat()
    record["expires_at"] = (issued + timedelta(hours=6)).isoformat()
    return record


async def _watch(
    gateway: Gateway, advisory_id: str, expected: int, deadline_s: float, console: Console, live: bool
) -> tuple[dict[str, dict[str, int]], float | None, float | None]:
    """Poll the store until every delivery is final (or timeout); returns counts and the two timings."""
    assert gateway.store is not None
    started = time.monotonic()
    all_sent = all_final = None
    counts: dict[str, dict[str, int]] = {}
    pending = {s.value for s in PENDING}
    final = {s.value for s in FINAL}
    last_print = 0.0
    with Live(console=console, refresh_per_second=4, transient=False) if live else _Null() as display:
        while time.monotonic() - started < deadline_s:
            counts = await gateway.store.counts(advisory_id)
            elapsed = time.monotonic() - started
            by_status: Counter[str] = Counter()
            for per in counts.values():
                by_status.update(per)
            total = sum(by_status.values())
            if live:
                display.update(table(counts, f"demo-evac-001 — {expected} recipients — {elapsed:5.1f}s"))
            elif elapsed - last_print >= 5:
                last_print = elapsed
                console.print(f"{elapsed:6.1f}s {dict(by_status)}")
            if total >= expected:
                if all_sent is None and not any(by_status[s] for s in pending):
                    all_sent = elapsed
                if all(s in final for s in by_status):
                    all_final = elapsed
                    break
            await asyncio.sleep(0.25)  # refresh rate of the progress display
    return counts, all_sent, all_final


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def update(self, _: object) -> None:
        return None


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    """What a person wants at the end: per channel, what we recorded and what the partner counted."""
    table = Table(title=f"{summary['recipients']} recipients")
    for column in ("channel", "delivered", "other", "partner accepted", "unique", "duplicates"):
        table.add_column(column, justify="left" if column == "channel" else "right")
    partners = summary["sandbox"]["channels"]
    for channel, by_status in sorted(summary["by_channel"].items()):
        counted = partners.get(channel, {})
        other = {s: n for s, n in by_status.items() if s != "delivered"}
        table.add_row(
            channel,
            str(by_status.get("delivered", 0)),
            ", ".join(f"{s} {n}" for s, n in other.items()) or "-",
            str(counted.get("accepted", "?")),
            str(counted.get("unique_recipients", "?")),
            str(counted.get("duplicates", "?")),
        )
    console.print(table)
    console.print(
        f"all sent after {summary['seconds_to_all_sent']} s, all delivered after "
        f"{summary['seconds_to_all_delivered']} s  (--json prints everything)"
    )
    agreement = summary["agreement"]
    console.print(
        ("[green]the store's counters, /metrics and the partners' own counts agree[/]")
        if agreement["agree"]
        else f"[red]the counts disagree[/]: {agreement}"
    )


def demo_env(
    workdir: Path, bootstrap: str, http_port: int, sandbox: SandboxProcess, sender: str, public_key: str
) -> dict[str, str]:
    """GATEWAY__ variables of a gateway on this broker, a SQLite file in ``workdir`` and the sandbox."""
    return {
        "GATEWAY__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "GATEWAY__STORE__URL": f"sqlite+aiosqlite:///{workdir / 'gateway.db'}",
        "GATEWAY__HTTP__PORT": str(http_port),
        **sandbox.gateway_env(),
        "GATEWAY__INTAKE__TRUSTED_KEYS": json.dumps({sender: public_key}),
        "GATEWAY__LOGGING__LEVEL": "warning",
    }


def demo_settings(
    workdir: Path,
    bootstrap: str,
    http_port: int,
    sandbox: SandboxProcess,
    sender: str,
    keys: tuple[str, str],
) -> Settings:
    """The demo's gateway: the production profile's approval policy (every advisory waits for a
    second person) and the sender's signing key for the API."""
    private_key, public_key = keys
    env = {
        **demo_env(workdir, bootstrap, http_port, sandbox, sender, public_key),
        "GATEWAY__API__SIGNING_KEYS": json.dumps({sender: private_key}),
        "GATEWAY__APPROVAL__RULES": "[{}]",
    }
    return load_settings(environ={**os.environ, **env})


async def submit_and_approve(gateway: Gateway, record: dict[str, Any]) -> dict[str, Any]:
    """The press office's way in: a press token submits over HTTP, a second person's token approves
    once intake has stored it. Returns who did what."""
    assert gateway.tokens is not None
    _, press = await gateway.tokens.create("demo-press-desk", ["press"], actor="demo")
    _, approver = await gateway.tokens.create("demo-duty-approver", ["approver"], actor="demo")
    url = gateway.public_url
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        headers = {"Authorization": f"Bearer {press}"}
        async with http.post(f"{url}/advisories", json=record, headers=headers) as resp:
            submitted = await resp.json(content_type=None)
            if resp.status != 202:
                raise RuntimeError(f"the API refused the demo advisory: {submitted}")
        headers = {"Authorization": f"Bearer {approver}"}
        for _ in range(200):  # intake stores it within a moment; until then there is nothing to approve
            async with http.post(f"{url}/advisories/{record['id']}/approve", headers=headers) as resp:
                approved = await resp.json(content_type=None)
                if resp.status == 200:
                    return {"submitted": submitted, "approved": approved}
                if resp.status not in (404, 409):
                    raise RuntimeError(f"the approval was refused: {approved}")
            await asyncio.sleep(0.05)  # intake has not stored it yet: nothing to approve
    raise RuntimeError("the submitted advisory was not stored within 10 s")


async def _enter(prompt: str, timeout_s: float) -> None:
    """Until the user presses Enter in the terminal, or ``timeout_s``."""
    loop = asyncio.get_running_loop()
    pressed = asyncio.Event()
    sys.stderr.write(prompt + "\n")

    def read() -> None:
        sys.stdin.readline()
        pressed.set()

    loop.add_reader(sys.stdin.fileno(), read)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pressed.wait(), timeout_s)
    finally:
        loop.remove_reader(sys.stdin.fileno())


async def _agreement(
    gateway: Gateway,
    token: str,
    advisory_id: str,
    counts: Mapping[str, Mapping[str, int]],
    sandbox_stats: Mapping[str, Any],
) -> dict[str, Any]:
    """The same numbers from four places at the end: the store's counters (what status, the API and
    the console read), /metrics scraped over HTTP, and the sandbox partners' own count of unique
    recipients; ``agree`` is whether they are equal per channel."""
    reached = {s.value for s in (Status.DELIVERED, Status.READ)}
    store = {ch: sum(n for s, n in per.items() if s in reached) for ch, per in counts.items()}
    key = f"{advisory_id}@v1"
    partner = {
        ch: int(stats["by_advisory"].get(key, {}).get("unique_recipients", 0))
        for ch, stats in sandbox_stats["channels"].items()
        if ch in counts
    }
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gateway.public_url}/metrics", headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        text = await resp.text()
    scraped: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "gateway_deliveries":
            continue
        for sample in family.samples:
            channel = sample.labels["channel"]
            if channel in counts and sample.labels["status"] in reached:
                scraped[channel] = scraped.get(channel, 0) + int(sample.value)
    return {
        "store": store,
        "metrics": scraped,
        "sandbox": partner,
        "agree": store == scraped == partner,
    }


async def run_demo(n: int, as_json: bool, deadline_s: float) -> int:
    console = Console(stderr=True)
    gw_logging.configure("warning", "auto")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    secret = secrets.token_urlsafe(32)
    keys = new_key()
    record = demo_advisory()
    country = record["audience"]["countries"][0]
    t_start = time.monotonic()
    async with EmbeddedBroker() as broker:
        http_port = free_port()
        async with SandboxProcess(secret, f"http://127.0.0.1:{http_port}") as sandbox:
            settings = demo_settings(
                workdir, broker.bootstrap_servers, http_port, sandbox, record["sender"], keys
            )
            console.print(
                f"[bold]broker[/] {broker.bootstrap_servers}  [bold]sandbox[/] {sandbox.url}  "
                f"[bold]store[/] {workdir / 'gateway.db'}",
                soft_wrap=True,
            )
            csv_path = workdir / "recipients.csv"
            await asyncio.to_thread(write_recipients, csv_path, n, country)
            store = await Store.open(settings.store.url)
            try:
                report = await import_file(store, csv_path)
            finally:
                await store.close()
            console.print(f"imported {report.loaded} recipients ({report.failed} bad rows)")
            gateway = Gateway(settings)
            await gateway.start()
            try:
                assert gateway.tokens is not None
                _, console_token = await gateway.tokens.create(
                    "demo-console", ["operator", "press"], actor="demo"
                )
                console_url = f"{gateway.public_url}/console/"
                console.print(  # not wrapped: the address and the token are copied from here
                    f"[bold]console[/] {console_url}\n[bold]token[/]   {console_token}\n"
                    "  (open the address in a browser and paste the token to watch the broadcast live)",
                    soft_wrap=True,
                )
                interactive = console.is_terminal and sys.stdin.isatty() and not as_json
                if interactive:
                    await _enter("press Enter to start the broadcast (it starts by itself in 20 s)", 20.0)
                approval = await submit_and_approve(gateway, record)
                console.print(
                    f"submitted {record['id']} over the API with a press token "
                    f"({approval['submitted']['needs_approval']}); approved by {approval['approved']['by']}"
                )
                counts, all_sent, all_final = await _watch(
                    gateway,
                    record["id"],
                    report.loaded,
                    deadline_s,
                    console,
                    console.is_terminal and not as_json,
                )
                sandbox_stats = await sandbox.stats()
                agreement = await _agreement(gateway, console_token, record["id"], counts, sandbox_stats)
                if interactive:
                    await _enter(
                        "the console stays up: press Enter to stop (it stops by itself in 10 min)", 600
                    )
            finally:
                await gateway.stop()
    deliveries: Counter[str] = Counter()
    for per in counts.values():
        deliveries.update(per)
    summary = {
        "recipients": report.loaded,
        "deliveries": dict(deliveries),
        "by_channel": counts,
        "seconds_to_all_sent": None if all_sent is None else round(all_sent, 2),
        "seconds_to_all_delivered": None if all_final is None else round(all_final, 2),
        "seconds_total": round(time.monotonic() - t_start, 2),
        "approval": approval,
        "console_url": console_url,
        "console_token": console_token,
        "agreement": agreement,
        "sandbox": sandbox_stats,
    }
    ok = all_final is not None and deliveries[Status.DELIVERED] + deliveries[Status.READ] == report.loaded
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_summary(console, summary)
        console.print(
            "[green]every delivery delivered[/]" if ok else "[red]not every delivery was delivered[/]"
        )
    return 0 if ok else 1
