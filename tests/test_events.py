"""Delivery events out (gateway/events.py): every applied status change reaches a configured webhook,
signed with HMAC, in order per delivery, retried when the receiver fails; a receiver that is down
never holds a broadcast back; a webhook without its secret stops start-up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import web

from channels.base import verify_hmac
from gateway.app import Gateway
from gateway.cli import publish
from gateway.errors import ConfigError
from gateway.events import RECORD_EVENTS, Publisher, records
from gateway.metrics import REGISTRY
from gateway.models import Recipient, Status, now
from gateway.sandbox.process import SandboxProcess
from gateway.schema import delivery_events
from gateway.settings import EventsSettings
from gateway.store import Event, Planned, Store
from tests.conftest import (
    advisory,
    eventually,
    load_recipients,
    make_settings,
    own_topics,
    reached,
    running_gateway,
    signed,
)

SECRET = "webhook-test-secret"
CHAIN = [s.value for s in sorted(Status, key=lambda s: s.rank)]


class Receiver:
    """A webhook receiver on a real socket: checks every signature, fails the first ``fail`` calls."""

    def __init__(self, fail: int = 0, always: int | None = None) -> None:
        self.fail, self.always = fail, always
        self.calls = 0
        self.bad_signatures = 0
        self.events: list[dict[str, Any]] = []
        self.sizes: list[int] = []  # events in each call taken
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls += 1
        try:
            verify_hmac(SECRET, body, request.headers)
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.always is not None:
            return web.Response(status=self.always)
        if self.calls <= self.fail:
            return web.Response(status=500)
        events = json.loads(body)["events"]
        self.events += events
        self.sizes.append(len(events))
        return web.Response(status=204)

    def statuses(self, delivery_id: str) -> list[str]:
        return [e["status"] for e in self.events if e["delivery_id"] == delivery_id]


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/events", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    receiver.url = f"http://127.0.0.1:{port}/events"
    try:
        yield receiver
    finally:
        await runner.cleanup()


def _settings(tmp_path: Path, kafka: str, sandbox: SandboxProcess, url: str, **env: str) -> Any:
    return make_settings(
        tmp_path,
        kafka,
        sandbox,
        GATEWAY__EVENTS__WEBHOOKS=json.dumps({"ops": {"url": url, "max_attempts": 6}}),
        GATEWAY__EVENTS__WEBHOOK_SECRETS=json.dumps({"ops": SECRET}),
        **env,
    )


async def test_every_status_change_reaches_the_webhook_signed_and_in_order_per_delivery(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    """Events are taken from the outbox many at a time (``events.take``) and reach a webhook in calls
    of at most ``events.batch``."""
    async with receiving(Receiver(fail=2)) as receiver:  # two 500s first: retried with backoff
        batch = {"GATEWAY__EVENTS__BATCH": "7", "GATEWAY__EVENTS__TAKE": "50"}
        settings = _settings(tmp_path, kafka_bootstrap, sandbox, receiver.url, **batch)
        async with running_gateway(settings, sandbox) as gw:
            await load_recipients(gw, tmp_path, 40)
            record = signed(advisory())
            await publish(gw.bootstrap_servers, gw.settings.kafka.topic_advisories, record)
            await eventually(lambda: reached(gw, record["id"], "delivered", 40), what="40 delivered")
            assert gw.store is not None
            ids = [str(r["id"]) for r in await _delivery_rows(gw, record["id"])]

            async def all_delivered_events() -> bool:
                return all("delivered" in receiver.statuses(i) for i in ids)

            await eventually(all_delivered_events, what="every delivered event at the webhook")
    assert receiver.bad_signatures == 0
    assert receiver.calls > 2
    assert max(receiver.sizes) == 7, receiver.sizes  # 120 events: takes of up to 50, calls of up to 7
    for i in ids:
        statuses = receiver.statuses(i)
        assert statuses[0] == "queued", statuses  # created queued (the planner)
        assert statuses == sorted(statuses, key=CHAIN.index), statuses  # in order per delivery
        assert len(statuses) == len(set(statuses)), statuses  # each change once
    sample = next(e for e in receiver.events if e["status"] == "delivered")
    assert sample["schema"] == "delivery-event/1"
    assert sample["advisory_id"] == record["id"]
    assert sample["language"] in {"kk", "ru", "en"}
    assert not {"phone", "email", "app_user", "recipient_id"} & set(sample)  # no personal data
    assert datetime.fromisoformat(sample["at"]).utcoffset() == timedelta(0)  # RFC 3339, UTC


def test_events_go_out_as_records_of_one_advisory_version_each_in_order() -> None:
    """One record per advisory version (keyed id@vN: a delivery's events on one partition, in
    order), split at RECORD_EVENTS so that no record outgrows the broker's limit."""

    def ev(seq: int, advisory_id: str) -> Event:
        return Event(seq, f"{advisory_id}@v1", json.dumps({"seq": seq, "delivery_id": f"d{seq}"}))

    events = [ev(i, "a" if i % 3 else "b") for i in range(RECORD_EVENTS * 2)]
    out = [(key, json.loads(part)["events"]) for key, part in records(events)]
    assert {k for k, _ in out} == {"a@v1", "b@v1"}
    assert all(len(part) <= RECORD_EVENTS for _, part in out)
    for key in ("a@v1", "b@v1"):
        seqs = [e["seq"] for k, part in out if k == key for e in part]
        assert seqs == sorted(e.seq for e in events if e.key == key)


async def _delivery_rows(gw: Gateway, advisory_id: str) -> list[Any]:
    import sqlalchemy as sa

    from gateway.schema import deliveries

    assert gw.store is not None
    async with gw.store.engine.connect() as conn:
        q = sa.select(deliveries.c.id).where(deliveries.c.advisory_id == advisory_id)
        return list((await conn.execute(q)).mappings().all())


async def test_a_receiver_that_is_down_never_holds_the_broadcast_back(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    async with receiving(Receiver(always=503)) as receiver:
        settings = _settings(tmp_path, kafka_bootstrap, sandbox, receiver.url)
        async with running_gateway(settings, sandbox) as gw:
            await load_recipients(gw, tmp_path, 40)
            record = signed(advisory())
            await publish(gw.bootstrap_servers, gw.settings.kafka.topic_advisories, record)
            await eventually(
                lambda: reached(gw, record["id"], "delivered", 40), what="delivered all the same"
            )

            async def retried() -> bool:
                return receiver.calls >= 3

            await eventually(retried, what="the webhook tried again")
    assert receiver.events == []


async def test_a_webhook_without_its_secret_stops_start_up(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path,
        kafka_bootstrap,
        sandbox,
        GATEWAY__EVENTS__WEBHOOKS=json.dumps({"ops": {"url": "http://127.0.0.1:9/events"}}),
    )
    with pytest.raises(ConfigError, match="no secret for webhook 'ops'"):
        async with running_gateway(settings, sandbox):
            await asyncio.sleep(0)  # never reached: start-up refuses


async def test_the_publisher_reports_how_long_the_oldest_event_waited(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """``gateway_delivery_events_lag_seconds``: how far behind the events are, as of the publisher's
    last take; 0 once it finds the outbox empty."""
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    try:
        await store.deliver_events(True)
        await store.upsert_recipients(
            [Recipient(id=f"r{i}", app_user=f"u{i}", country="XA") for i in range(3)]
        )
        await store.insert_deliveries("a", 1, [Planned(f"r{i}", "push", Status.QUEUED) for i in range(3)])
        async with store.engine.begin() as conn:  # the events were made 90 s ago
            await conn.execute(sa.update(delivery_events).values(at=now() - timedelta(seconds=90)))
        async with own_topics(kafka_bootstrap) as (topics, producer), aiohttp.ClientSession() as session:
            publisher = Publisher(store, producer, topics.topic_events, EventsSettings(), {}, session)
            assert await publisher.publish_oldest() == 3
            assert 90 <= (REGISTRY.get_sample_value("gateway_delivery_events_lag_seconds") or 0) < 120
            assert await publisher.publish_oldest() == 0
            assert REGISTRY.get_sample_value("gateway_delivery_events_lag_seconds") == 0
    finally:
        await store.close()


async def test_an_event_number_is_never_given_again_once_the_outbox_is_empty(store: Store) -> None:
    """``seq`` only grows: a consumer never sees it go back, and an event made after the outbox was
    emptied can never be taken for one published before (migration 0013; on SQLite the numbers began
    again at 1)."""
    await store.deliver_events(True)
    await store.upsert_recipients([Recipient(id=f"r{i}", app_user=f"u{i}", country="XA") for i in range(6)])
    taken: list[Event] = []

    async def publish(events: list[Event]) -> None:
        taken.extend(events)

    await store.insert_deliveries("a", 1, [Planned(f"r{i}", "push", Status.QUEUED) for i in range(3)])
    assert await store.take_events(100, publish) == 3
    assert await store.take_events(100, publish) == 0  # the outbox is empty
    await store.insert_deliveries("a", 1, [Planned(f"r{i}", "push", Status.QUEUED) for i in range(3, 6)])
    assert await store.take_events(100, publish) == 3
    seqs = [e.seq for e in taken]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 6
