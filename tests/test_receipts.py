"""Receipt webhooks: whatever a caller sends, the answer is 2xx, 400, 401 or 413 problem+json —
never a 500; and only receipts that change a delivery become events on ``delivery-events`` (beside
every other applied change of the delivery, in order)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer

from channels.base import hmac_headers
from channels.email import recipient_partner_id
from gateway.app import Gateway
from gateway.cli import publish
from gateway.models import Status
from gateway.sandbox.process import SandboxProcess
from gateway.store import Outcome, Planned
from tests.conftest import advisory, bearer, events_in, eventually, load_recipients, reached, signed


async def _events_until(gw: Gateway, done: Callable[[list[tuple[str, str]]], bool]) -> list[tuple[str, str]]:
    """(delivery id, status) of every event from the start of ``delivery-events`` until ``done``
    says they are enough. Events of one advisory version share a partition, in order."""
    consumer = AIOKafkaConsumer(
        gw.settings.kafka.topic_events,
        bootstrap_servers=gw.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    seen: list[tuple[str, str]] = []
    try:
        async with asyncio.timeout(30):
            while not done(seen):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    seen += [(e["delivery_id"], e["status"]) for e in events_in(records)]
    finally:
        await consumer.stop()
    return seen


async def _unmatched(http: aiohttp.ClientSession, headers: dict[str, str]) -> float:
    async with http.get("/metrics", headers=headers) as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith('gateway_receipts_unmatched_total{channel="push"}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(gateway.public_url) as session:
        yield session


def _signed_post(secret: str, body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json", **hmac_headers(secret, body)}


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[" * 100_000, "deep nesting"),
        (b'{"receipts": ' + b"[" * 50 + b"]" * 50 + b"}", "nested lists as receipts"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b'{"receipts": "not a list"}', "wrong type"),
        (b'{"receipts": [{"status": "delivered"}]}', "receipt without its key"),
        (b'{"receipts": [{"idempotency_key": "x", "status": "teleported"}]}', "unknown status"),
        (b'{"receipts": [[1, 2]]}', "a receipt that is a list"),
    ],
)
async def test_a_malformed_signed_body_is_a_400_problem(
    http: aiohttp.ClientSession, secret: str, body: bytes, why: str
) -> None:
    async with http.post("/receipts/push", data=body, headers=_signed_post(secret, body)) as resp:
        assert resp.status == 400, why
        problem = await resp.json(content_type="application/problem+json")
        assert problem["field"] == "receipts"
        assert problem["detail"]


async def test_an_oversized_body_without_a_length_is_a_413_problem(
    http: aiohttp.ClientSession, secret: str
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(80):  # 5 MiB, chunked: no Content-Length to refuse it by
            yield b" " * 65536

    async with http.post("/receipts/push", data=chunks(), headers={"X-Timestamp": "1"}) as resp:
        assert resp.status == 413
        assert (await resp.json(content_type="application/problem+json"))["field"] == "body"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Timestamp": "1700000000", "X-Signature": "v1=é" * 10},
        {"X-Timestamp": "١٧٠٠٠٠٠٠٠٠", "X-Signature": "v1=00"},  # Arabic-Indic digits are isdigit()
        {"X-Timestamp": "²", "X-Signature": "v1=00"},
    ],
)
async def test_a_non_ascii_signature_header_is_a_401(
    http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    raw = {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()}
    async with http.post("/receipts/push", data=b'{"receipts": []}', headers=raw) as resp:
        assert resp.status == 401
        assert (await resp.json(content_type="application/problem+json"))["title"] == "Unauthenticated"


async def test_only_receipts_that_change_a_delivery_become_events(
    gateway: Gateway, sandbox: SandboxProcess, http: aiohttp.ClientSession, secret: str, tmp_path: Path
) -> None:
    await load_recipients(gateway, tmp_path, 3)
    record = signed(advisory())
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)
    await eventually(lambda: reached(gateway, record["id"], "delivered", 3), what="3 delivered")

    operator = await bearer(gateway)
    unmatched = await _unmatched(http, operator)
    ids = [
        (await gateway.store.delivery_of(record["id"], 1, f"r{i:05d}", "push") or {})["id"] for i in range(3)
    ]
    stranger = "no-such-delivery"
    again = [{"idempotency_key": i, "status": "delivered", "message_id": "m"} for i in ids]
    unknown = [{"idempotency_key": stranger, "status": "delivered", "message_id": "m"}]
    body = json.dumps({"receipts": again + unknown}).encode()
    async with http.post("/receipts/push", data=body, headers=_signed_post(secret, body)) as resp:
        assert resp.status == 200
        assert await resp.json() == {"received": 4, "moved": 0, "held": 0}

    read = json.dumps(
        {"receipts": [{"idempotency_key": i, "status": "read", "message_id": "m"} for i in ids]}
    )
    async with http.post("/receipts/push", data=read, headers=_signed_post(secret, read.encode())) as resp:
        assert await resp.json() == {"received": 3, "moved": 3, "held": 0}
    events = await _events_until(gateway, lambda seen: all((i, "read") in seen for i in ids))
    assert not [e for e in events if e[0] == stranger], "a receipt naming no delivery is no event"
    chain = [s.value for s in sorted(Status, key=lambda s: s.rank)]
    for i in ids:  # every applied change of each delivery, once, in order; the repeated receipts none
        statuses = [status for d, status in events if d == i]
        assert statuses[0] == "queued"  # created queued (the planner)
        assert statuses[-2:] == ["delivered", "read"]
        assert statuses == sorted(statuses, key=chain.index), statuses
        assert len(set(statuses)) == len(statuses), statuses
    assert await _unmatched(http, operator) == unmatched + 1


async def test_an_event_that_comes_before_its_message_is_recorded_is_applied_once_it_is(
    gateway: Gateway, http: aiohttp.ClientSession, secret: str, tmp_path: Path
) -> None:
    """A relay's event for a shared e-mail, posted before the gateway wrote down the relay's 250 for
    it (the partner id the event is matched by): held, answered 200, and applied by the running
    gateway once the 250 is recorded — an event on ``delivery-events`` like any receipt."""
    await load_recipients(gateway, tmp_path, 1)
    [d] = await gateway.store.insert_deliveries("adv-held", 1, [Planned("r00000", "email", Status.QUEUED)])
    message_id, address = "<d0.5eed@gateway.mfa.example>", "r00000@example.kz"
    event = {"message_id": message_id, "recipient": address, "event": "delivered"}
    body = json.dumps({"events": [event]}).encode()
    async with http.post("/receipts/email", data=body, headers=_signed_post(secret, body)) as resp:
        assert await resp.json() == {"received": 1, "moved": 0, "held": 1}
    partner_id = recipient_partner_id(message_id, address)
    sent = [Outcome(d, Status.SENT, partner_id=partner_id)]
    await gateway.store.record(sent, attempted=True, refs_channel="email")

    async def delivered() -> bool:
        return (await gateway.store.delivery(d) or {}).get("status") == "delivered"

    await eventually(delivered, what="the held event applied")
    events = await _events_until(gateway, lambda seen: (d, "delivered") in seen)
    assert [status for i, status in events if i == d] == ["queued", "sent", "delivered"]


async def test_a_replayed_signed_receipt_call_is_a_401(http: aiohttp.ClientSession, secret: str) -> None:
    body = b'{"receipts": [{"idempotency_key": "not-ours", "status": "delivered"}]}'
    headers = _signed_post(secret, body)
    async with http.post("/receipts/push", data=body, headers=headers) as resp:
        assert resp.status == 200
    async with http.post("/receipts/push", data=body, headers=headers) as resp:
        assert resp.status == 401
        assert "replayed" in (await resp.json(content_type="application/problem+json"))["detail"]
    retry = {"Content-Type": "application/json", **hmac_headers(secret, body, at=time.time() + 1)}
    async with http.post("/receipts/push", data=body, headers=retry) as resp:
        assert resp.status == 200  # the partner's retry, signed anew a second later: not a replay
