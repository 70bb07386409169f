"""``broadcast-gateway report ID --csv`` on a finished broadcast: one row per delivery, addresses
masked unless asked (and then audited), streamed from the store."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from gateway import audit
from gateway.models import Advisory, Recipient, Status
from gateway.planner import plan_recipients, queued_by_channel
from gateway.store import Outcome, Store
from tests.conftest import advisory

KINDS = {"push": "push", "sms-http": "sms", "email": "email"}


def _cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``broadcast-gateway <args>`` against the store in ``db``, on a 160-column terminal."""
    env = {**os.environ, "GATEWAY__STORE__URL": f"sqlite+aiosqlite:///{db}", "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def _finished_broadcast(db: Path) -> tuple[Advisory, dict[str, str]]:
    """30 recipients on three channels: delivered, except one bounced e-mail."""
    store = await Store.open(f"sqlite+aiosqlite:///{db}")
    try:
        adv = Advisory.model_validate(advisory(channels=["push", "sms-http", "email"]))
        await store.accept(adv, adv.model_dump(mode="json"), {})
        people = [Recipient(id=f"p{i:02d}", app_user=f"app-user-{i}", country="XA") for i in range(10)]
        people += [Recipient(id=f"s{i:02d}", phone=f"+7701{i:07d}", country="XA") for i in range(10)]
        people += [Recipient(id=f"e{i:02d}", email=f"aigerim{i}@example.kz", country="XA") for i in range(10)]
        await store.upsert_recipients(people)
        planned = plan_recipients(adv, people, KINDS)
        by_channel = queued_by_channel(planned, await store.insert_deliveries(adv.id, adv.version, planned))
        ids = [i for channel in by_channel.values() for i in channel]
        bounced = by_channel["email"][0]
        await store.record([Outcome(i, Status.SENT, partner_id=f"m-{i}") for i in ids], attempted=True)
        await store.record([Outcome(i, Status.DELIVERED) for i in ids if i != bounced])
        await store.record([Outcome(bounced, Status.FAILED, reason="550 mailbox unavailable")])
        return adv, {"bounced": bounced}
    finally:
        await store.close()


async def test_report_lists_every_delivery_with_masked_addresses(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    adv, ids = await _finished_broadcast(db)
    result = _cli(db, "report", adv.id, "--csv")
    assert result.returncode == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(table) == 30
    by_channel = {ch: [r for r in table if r["channel"] == ch] for ch in KINDS}
    assert {ch: len(rs) for ch, rs in by_channel.items()} == {"push": 10, "sms-http": 10, "email": 10}
    (bounced,) = [r for r in table if r["status"] == "failed"]
    assert (bounced["delivery_id"], bounced["reason"], bounced["attempts"]) == (
        ids["bounced"],
        "550 mailbox unavailable",
        "1",
    )
    assert {r["status"] for r in table} == {"delivered", "failed"}
    sms = next(r for r in by_channel["sms-http"] if r["recipient_id"] == "s03")
    assert sms["address"] == "+770*****003"  # enough to tell apart, not to dial
    email = next(r for r in by_channel["email"] if r["recipient_id"] == "e04")
    assert email["address"] == "a***@example.kz"
    assert all("example.kz" in r["address"] and "aigerim" not in r["address"] for r in by_channel["email"])
    assert all(r["address"].endswith("***") for r in by_channel["push"])
    assert all(r["sent_at"] for r in table)


async def test_an_unmasked_report_shows_addresses_and_is_in_the_audit_log(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    adv, _ = await _finished_broadcast(db)
    result = _cli(db, "report", adv.id, "--csv", "--unmasked")
    assert result.returncode == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert next(r for r in table if r["recipient_id"] == "s03")["address"] == "+77010000003"
    store = await Store.open(f"sqlite+aiosqlite:///{db}")
    try:
        (entry,) = await audit.read(store.engine, adv.id)
    finally:
        await store.close()
    assert (entry["action"], entry["actor"].startswith("cli:")) == ("report.unmasked", True)
    assert _cli(db, "report", "no-such-advisory", "--csv").returncode == 1


async def test_status_draws_a_table_with_a_bar_per_channel_and_keeps_json(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    adv, _ = await _finished_broadcast(db)
    drawn = _cli(db, "status", adv.id)
    assert drawn.returncode == 0, drawn.stderr
    lines = {line.split("│")[1].strip(): line for line in drawn.stdout.splitlines() if line.count("│") > 3}
    assert {"push", "sms-http", "email", "all"} <= set(lines)
    assert "10/10" in lines["email"]  # 9 delivered and 1 failed: every one final
    assert [c.strip() for c in lines["all"].split("│")[3:-1]] == ["29", "1"]  # delivered, failed
    as_json = _cli(db, "status", adv.id, "--json")
    assert json.loads(as_json.stdout)["by_channel"]["email"] == {"delivered": 9, "failed": 1}
    unknown = _cli(db, "status", "nope")
    assert (unknown.returncode, unknown.stdout.strip()) == (1, "advisory_id: no deliveries for 'nope'")
