"""Delivery guarantees over real parts (Kafka, SQLite, the sandbox partners over HTTP): partner faults
and outages, the circuit breaker, lanes that never wait for each other, priority, cancel, update,
backpressure and the cascade — each judged by what the sandbox partner itself counted."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.cli import publish
from gateway.directory import import_file
from gateway.errors import ConfigError
from gateway.lifecycle import AdvisoryState
from gateway.sandbox.process import SandboxProcess
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import (
    advisory,
    eventually,
    load_recipients,
    make_settings,
    reached,
    running_gateway,
    signed,
)

# small chunks and batches, so that a broadcast of a few hundred is many partner requests
FINE_GRAINED = {
    "GATEWAY__PLANNER__CHUNK_SIZE": "25",
    "GATEWAY__CHANNELS__PUSH__BURST": "25",
}
BULK = {"severity": "minor", "urgency": "expected"}


def _fine_grained(tmp_path: Path, kafka: str, sandbox: SandboxProcess, **env: str) -> Settings:
    """An isolated gateway's settings with small chunks and batches (and ``env`` on top)."""
    return make_settings(tmp_path, kafka, sandbox, **{**FINE_GRAINED, **env})


async def _publish(gw: Gateway, record: dict[str, Any]) -> None:
    await publish(gw.bootstrap_servers, gw.settings.kafka.topic_advisories, record)


async def _counted(sandbox: SandboxProcess, record: dict[str, Any], channel: str = "push") -> dict[str, Any]:
    """What the partner counted for one advisory version."""
    key = f"{record['id']}@v{record.get('version', 1)}"
    by: dict[str, Any] = (await sandbox.stats())["channels"][channel]["by_advisory"]
    return by.get(key, {"accepted": 0, "unique_recipients": 0, "duplicates": 0})


async def _each_once(sandbox: SandboxProcess, record: dict[str, Any], n: int, channel: str = "push") -> None:
    """The partner took the advisory for ``n`` recipients, none of them twice."""
    counted = await _counted(sandbox, record, channel)
    assert (counted["unique_recipients"], counted["duplicates"]) == (n, 0)


async def _accepted_at_least(sandbox: SandboxProcess, record: dict[str, Any], n: int) -> bool:
    return (await _counted(sandbox, record))["accepted"] >= n


def _store(gw: Gateway) -> Store:
    assert gw.store is not None
    return gw.store


async def _push_counts(gw: Gateway, advisory_id: str) -> dict[str, int]:
    return (await _store(gw).counts(advisory_id)).get("push", {})


async def _none_pending(gw: Gateway, advisory_id: str) -> bool:
    counts = await _store(gw).counts(advisory_id)
    return not any(per.get("planned") or per.get("queued") for per in counts.values())


@pytest.mark.parametrize(
    ("fault", "opens_circuit"),
    [
        ({"status": 503, "count": 3}, True),
        ({"status": 429, "retry_after": 0.3, "count": 3}, False),
        ({"reset": True, "count": 3}, True),
        ({"hang": True, "count": 2}, True),
    ],
    ids=["503", "429-retry-after", "connection-reset", "timeout"],
)
async def test_partner_faults_are_retried_and_every_recipient_gets_one_push(
    kafka_bootstrap: str,
    sandbox: SandboxProcess,
    tmp_path: Path,
    fault: dict[str, Any],
    opens_circuit: bool,
) -> None:
    settings = _fine_grained(
        tmp_path,
        kafka_bootstrap,
        sandbox,
        GATEWAY__CHANNELS__PUSH__TIMEOUT_S="0.5",
        GATEWAY__CHANNELS__PUSH__CIRCUIT__FAILURES_TO_OPEN="1",
        GATEWAY__CHANNELS__PUSH__CIRCUIT__OPEN_S="0.2",
    )
    async with running_gateway(settings, sandbox) as gw:
        await load_recipients(gw, tmp_path, 200)
        await sandbox.faults(**fault)
        record = signed(advisory())
        await _publish(gw, record)
        await eventually(lambda: reached(gw, record["id"], "delivered", 200), what="200 delivered")
        opened = gw.adapters["push"].circuit.opened
    await _each_once(sandbox, record, 200)
    assert (opened > 0) is opens_circuit, "a throttle is not an outage; the others are"


async def test_an_outage_opens_the_circuit_and_delays_deliveries_without_failing_them(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    settings = _fine_grained(
        tmp_path,
        kafka_bootstrap,
        sandbox,
        GATEWAY__DISPATCH__MAX_ATTEMPTS="4",
        GATEWAY__CHANNELS__PUSH__CIRCUIT__FAILURES_TO_OPEN="2",
        GATEWAY__CHANNELS__PUSH__CIRCUIT__OPEN_S="0.2",
    )
    async with running_gateway(settings, sandbox) as gw:
        await load_recipients(gw, tmp_path, 300)
        await sandbox.faults(status=503)  # until cleared
        record = signed(advisory())
        await _publish(gw, record)
        circuit = gw.adapters["push"].circuit

        async def reopened_several_times() -> bool:
            return circuit.opened >= 4  # outlasting the attempts a batch may spend

        await eventually(reopened_several_times, what="the circuit opened again and again")
        during = await _push_counts(gw, record["id"])
        assert "failed" not in during, "an outage delays; it does not fail deliveries"
        await sandbox.faults(count=0)
        await eventually(lambda: reached(gw, record["id"], "delivered", 300), what="300 delivered")
    await _each_once(sandbox, record, 300)


async def test_a_dead_push_partner_never_slows_the_sms_lane(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    settings = _fine_grained(
        tmp_path,
        kafka_bootstrap,
        sandbox,
        GATEWAY__CHANNELS__PUSH__TIMEOUT_S="1.0",
        GATEWAY__CHANNELS__PUSH__CIRCUIT__MAX_OPEN_S="2.0",
    )
    async with running_gateway(settings, sandbox) as gw:
        await load_recipients(gw, tmp_path, 200, country="XA")
        await load_recipients(gw, tmp_path, 200, country="XB", reach="phone", languages="en", prefix="s")
        await sandbox.faults(hang=True)  # every push request hangs until the client gives up
        push = signed(advisory())
        sms = signed(advisory(channels=["sms-http"], audience={"countries": ["XB"]}))
        await _publish(gw, push)
        await _publish(gw, sms)
        await eventually(
            lambda: reached(gw, sms["id"], "delivered", 200, "sms-http"), what="every SMS delivered"
        )
        assert (await _push_counts(gw, push["id"])) == {"queued": 200}, "push was still down meanwhile"
        await sandbox.faults(count=0)
        await eventually(lambda: reached(gw, push["id"], "delivered", 200), what="push caught up")


async def test_an_urgent_advisory_overtakes_a_bulk_broadcast_already_under_way(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    settings = _fine_grained(tmp_path, kafka_bootstrap, sandbox)
    async with running_gateway(settings, sandbox) as gw:
        await load_recipients(gw, tmp_path, 1000)
        await sandbox.faults(latency_s=0.15, count=-1)  # a slow partner: the bulk takes a while
        bulk = signed(advisory(**BULK))
        await _publish(gw, bulk)
        await eventually(lambda: _accepted_at_least(sandbox, bulk, 100), what="the bulk under way")
        urgent = signed(advisory())
        await _publish(gw, urgent)
        await eventually(lambda: reached(gw, urgent["id"], "delivered", 1000), within=90, what="urgent")
        bulk_when_urgent_done = (await _counted(sandbox, bulk))["accepted"]
        await eventually(lambda: reached(gw, bulk["id"], "delivered", 1000), within=90, what="bulk")
    assert bulk_when_urgent_done < 1000, "the urgent advisory finished while the bulk one was still going"
    u, b = await _counted(sandbox, urgent), await _counted(sandbox, bulk)
    assert u["last_at"] < b["last_at"]
    assert (u["duplicates"], b["duplicates"]) == (0, 0)


async def test_a_cancel_mid_broadcast_stops_every_pending_delivery(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    settings = _fine_grained(tmp_path, kafka_bootstrap, sandbox)
    async with running_gateway(settings, sandbox) as gw:
        await load_recipients(gw, tmp_path, 1000)
        await sandbox.faults(latency_s=0.1, count=-1)
        alert = signed(advisory())
        await _publish(gw, alert)
        await eventually(lambda: _accepted_at_least(sandbox, alert, 100), what="the alert under way")
        cancel = signed(
            advisory(id=f"cancel-{uuid.uuid4().hex[:6]}", msg_type="cancel", references=[alert["id"]])
        )
        await _publish(gw, cancel)

        async def cancelled() -> bool:
            return await _store(gw).advisory_state(alert["id"], 1) == AdvisoryState.CANCELLED

        await eventually(cancelled, what="the cancel applied")
        applied_at = time.time()
        await eventually(lambda: _none_pending(gw, alert["id"]), within=5, what="nothing pending")

        async def agrees_with_partner() -> bool:
            # requests already on their way when the cancel landed are answered, and recorded as sent
            if gw.adapters["push"].requests_open:
                return False
            counts = await _push_counts(gw, alert["id"])
            return counts.get("delivered", 0) == (await _counted(sandbox, alert))["accepted"]

        await eventually(agrees_with_partner, what="every in-flight answer recorded, every receipt in")
        counts = await _push_counts(gw, alert["id"])
    stats = (await sandbox.stats(since=applied_at + 1.0))["channels"]["push"]["by_advisory"]
    counted = stats[f"{alert['id']}@v1"]
    assert counted["accepted_since"] == 0, "nothing sent a second after the cancel"
    assert counts.get("cancelled", 0) > 0
    sent = counts.get("sent", 0) + counts.get("delivered", 0)
    assert sent + counts["cancelled"] == sum(counts.values()), counts  # nothing pending, nothing failed
    assert counted["accepted"] == sent, (counted, counts)
    assert counted["duplicates"] == 0


async def test_a_cancel_that_overtakes_its_alert_keeps_the_alert_from_ever_being_sent(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    await load_recipients(gateway, tmp_path, 50)
    alert = signed(advisory())
    cancel = signed(
        advisory(id=f"cancel-{uuid.uuid4().hex[:6]}", msg_type="cancel", references=[alert["id"]])
    )
    await _publish(gateway, cancel)  # the cancel arrives first (as if the alert were delayed on its way)

    async def cancel_stored() -> bool:
        return await _store(gateway).advisory_state(cancel["id"], 1) is not None

    await eventually(cancel_stored, what="the cancel taken in")
    await _publish(gateway, alert)

    async def stored_cancelled() -> bool:
        return await _store(gateway).advisory_state(alert["id"], 1) == AdvisoryState.CANCELLED

    await eventually(stored_cancelled, what="the alert stored as cancelled")
    later = signed(advisory())  # an unrelated advisory behind it is delivered: the alert's turn has passed
    await _publish(gateway, later)
    await eventually(lambda: reached(gateway, later["id"], "delivered", 50), what="the next advisory")
    assert await _store(gateway).counts(alert["id"]) == {}
    assert (await _counted(sandbox, alert))["accepted"] == 0


async def test_an_update_supersedes_pending_deliveries_and_reaches_everyone(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    settings = _fine_grained(tmp_path, kafka_bootstrap, sandbox)
    async with running_gateway(settings, sandbox) as gw:
        await load_recipients(gw, tmp_path, 600)
        await sandbox.faults(latency_s=0.1, count=-1)
        first = signed(advisory(**BULK))
        await _publish(gw, first)
        await eventually(lambda: _accepted_at_least(sandbox, first, 100), what="v1 under way")
        update = signed({**advisory(**BULK), "id": first["id"], "version": 2, "msg_type": "update"})
        await _publish(gw, update)

        async def settled() -> bool:
            versions = await _version_counts(settings.store.url, first["id"])
            settled_v1 = set(versions.get(1, {})) <= {"delivered", "cancelled"}
            return versions.get(2) == {"delivered": 600} and settled_v1

        await eventually(settled, within=60, what="v2 delivered to all, nothing of v1 pending")
    counted_v1, counted_v2 = await _counted(sandbox, first), await _counted(sandbox, update)
    assert counted_v2["unique_recipients"] == 600, "everyone gets the update"
    assert 0 < counted_v1["accepted"] < 600, "only those already notified got v1"
    assert counted_v1["duplicates"] == counted_v2["duplicates"] == 0
    v1 = (await _version_counts(settings.store.url, first["id"]))[1]
    assert set(v1) == {"delivered", "cancelled"}, v1  # v1's pending deliveries: superseded
    assert v1["delivered"] == counted_v1["accepted"], "the store agrees with the partner"


async def _version_counts(url: str, advisory_id: str) -> dict[int, dict[str, int]]:
    import sqlalchemy as sa

    from gateway.schema import deliveries

    store = await Store.open(url)
    try:
        q = (
            sa.select(deliveries.c.version, deliveries.c.status, sa.func.count())
            .where(deliveries.c.advisory_id == advisory_id)
            .group_by(deliveries.c.version, deliveries.c.status)
        )
        out: dict[int, dict[str, int]] = {}
        async with store.engine.connect() as conn:
            for version, status, n in (await conn.execute(q)).all():
                out.setdefault(int(version), {})[str(status)] = int(n)
        return out
    finally:
        await store.close()


async def test_backpressure_keeps_what_dispatch_holds_bounded(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path,
        kafka_bootstrap,
        sandbox,
        GATEWAY__PLANNER__CHUNK_SIZE="10",
        GATEWAY__CHANNELS__PUSH__BURST="10",
        GATEWAY__DISPATCH__MAX_BUFFERED_CHUNKS="4",
    )
    async with running_gateway(settings, sandbox) as gw:
        await load_recipients(gw, tmp_path, 400)  # 40 chunks
        await sandbox.faults(latency_s=0.05, count=-1)
        record = signed(advisory(**BULK))
        await _publish(gw, record)
        await eventually(lambda: reached(gw, record["id"], "delivered", 400), within=60, what="400 delivered")
        assert gw.dispatcher is not None
        assert 0 < gw.dispatcher.most_buffered <= 4
    await _each_once(sandbox, record, 400)


async def test_a_recipient_not_confirmed_on_push_in_time_gets_sms_and_a_late_push_receipt_undoes_nothing(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path, kafka_bootstrap, sandbox, GATEWAY__CHANNELS__PUSH__CASCADE_WINDOW_S="1.0"
    )
    n = 60
    path = tmp_path / "both.csv"
    rows = [f"c{i:04d},en,app-c{i},+7701{i:07d},XC" for i in range(n)]
    path.write_text("id,languages,app_user,phone,country\n" + "\n".join(rows) + "\n", encoding="utf-8")
    async with running_gateway(settings, sandbox) as gw:
        await import_file(_store(gw), path)
        await sandbox.configure("push", receipt_url=None)  # push receipts held back: never confirmed
        record = signed(advisory(channels=["push", "sms-http"], audience={"countries": ["XC"]}))
        await _publish(gw, record)
        await eventually(
            lambda: reached(gw, record["id"], "delivered", n, "sms-http"), what="SMS after the push window"
        )
        assert await _push_counts(gw, record["id"]) == {"sent": n}
        await sandbox.configure("push", receipt_url=f"{gw.public_url}/receipts/push")  # late receipts
        await eventually(lambda: reached(gw, record["id"], "delivered", n), what="late push receipts")
        counts = await _store(gw).counts(record["id"])
        by_language = {
            (c.channel, c.language, c.status): c.n for c in await _store(gw).progress(record["id"])
        }
        assert await _store(gw).progress(record["id"]) == await _store(gw).recount(record["id"])
    assert counts == {"push": {"delivered": n}, "sms-http": {"delivered": n}}
    assert by_language == {("push", "en", "delivered"): n, ("sms-http", "en", "delivered"): n}
    await _each_once(sandbox, record, n, "sms-http")


async def test_a_circuit_that_would_open_only_after_every_attempt_is_spent_is_refused_at_start(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path,
        kafka_bootstrap,
        sandbox,
        GATEWAY__DISPATCH__MAX_ATTEMPTS="4",
        GATEWAY__CHANNELS__PUSH__CIRCUIT__FAILURES_TO_OPEN="4",
    )
    with pytest.raises(ConfigError, match=r"channels\.push\.circuit\.failures_to_open"):
        async with running_gateway(settings):
            pass
