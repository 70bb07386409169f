"""The console script as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.cli import load_advisory_file, record_key
from gateway.errors import InputError
from gateway.settings import PROJECT_ROOT


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_publish_refuses_an_invalid_advisory_naming_the_field(tmp_path: Path) -> None:
    bad = yaml.safe_load((PROJECT_ROOT / "config" / "demo-advisory.yaml").read_text(encoding="utf-8"))
    bad.update(issued_at="2026-01-01T00:00:00Z", expires_at="2026-01-02T00:00:00Z", urgency="now-ish")
    path = tmp_path / "adv.yaml"
    path.write_text(yaml.safe_dump(bad), encoding="utf-8")
    result = _cli("publish", str(path), env={"GATEWAY__KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert result.returncode == 2
    assert "urgency" in result.stderr


def test_a_bad_configuration_key_stops_the_cli_naming_it() -> None:
    result = _cli("status", env={"GATEWAY__STORE__URI": "sqlite+aiosqlite:///x.db"})
    assert result.returncode == 2
    assert "store.uri: unknown key" in result.stderr


def test_yaml_advisory_timestamps_become_wire_text(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("id: x\nissued_at: 2026-11-25T10:00:00Z\n", encoding="utf-8")
    assert load_advisory_file(path)["issued_at"] == "2026-11-25T10:00:00+00:00"
    path.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(InputError, match="mapping"):
        load_advisory_file(path)


def test_recipients_import_reports_bad_lines_and_loads_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("id,app_user,country\nok1,u1,XA\nbad,u2,XAX\nok2,u3,XA\n", encoding="utf-8")
    env = {"GATEWAY__STORE__URL": f"sqlite+aiosqlite:///{tmp_path / 'g.db'}"}
    result = _cli("recipients", "import", str(path), env=env)
    assert result.returncode == 1
    assert "r.csv:3: country" in result.stderr
    assert "loaded 2 recipients (0 with warnings); 1 rows skipped" in result.stdout


def test_demo_runs_end_to_end_and_prints_its_json_summary() -> None:
    result = _cli("demo", "--recipients", "300", "--json", timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["recipients"] == 300
    assert summary["deliveries"] == {"delivered": 300}
    assert set(summary["by_channel"]) == {"push", "sms-http", "email"}
    assert all(set(per) == {"delivered"} for per in summary["by_channel"].values())
    assert summary["seconds_to_all_sent"] <= summary["seconds_to_all_delivered"]
    # the press office's way in: submitted with a press token, held for and approved by a second one
    approval = summary["approval"]
    assert approval["submitted"]["needs_approval"] == "approval.rules[0]: every advisory"
    assert (approval["approved"]["state"], approval["approved"]["by"].split(":")[-1]) == (
        "active",
        "demo-duty-approver",
    )
    # the console's address and a token that opens it; the store, /metrics and the partners agree
    assert summary["console_url"].endswith("/console/")
    assert summary["console_token"].startswith("gw_")
    agreement = summary["agreement"]
    assert agreement["agree"] is True, agreement
    assert sum(agreement["metrics"].values()) == 300
    partners = summary["sandbox"]["channels"]
    for channel, per in summary["by_channel"].items():
        counted = partners[channel]
        assert (counted["accepted"], counted["unique_recipients"], counted["duplicates"]) == (
            per["delivered"],
            per["delivered"],
            0,
        )


def test_a_cancel_or_update_is_keyed_by_the_advisory_it_names_so_it_cannot_overtake_it() -> None:
    assert record_key({"id": "evac-1", "msg_type": "alert"}) == b"evac-1"
    assert record_key({"id": "evac-1-cancel", "msg_type": "cancel", "references": ["evac-1@v2"]}) == b"evac-1"
    assert record_key({"id": "evac-2", "msg_type": "update", "references": ["evac-1"]}) == b"evac-1"
