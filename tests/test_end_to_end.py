"""The whole path over real parts: Kafka (Tansu + aiokafka) → store (SQLite) → sandbox partner over
HTTP → signed receipts back → delivered."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.consumer import fetcher
from aiokafka.producer import message_accumulator
from aiokafka.record.default_records import DefaultRecordBatch

from channels.base import hmac_headers
from gateway import kafka
from gateway.app import Gateway
from gateway.cli import publish, record_key
from gateway.directory import import_file
from gateway.sandbox.process import SandboxProcess
from tests.conftest import (
    advisory,
    bearer,
    events_in,
    eventually,
    load_recipients,
    reached,
    read_topic,
    signed,
)


async def test_published_advisory_is_delivered_once_to_every_recipient(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    await load_recipients(gateway, tmp_path, 1200)
    record = signed(advisory())
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)

    await eventually(lambda: reached(gateway, record["id"], "delivered", 1200), what="1200 delivered")

    stats = (await sandbox.stats())["channels"]["push"]
    per_advisory = stats["by_advisory"][f"{record['id']}@v1"]
    assert (per_advisory["accepted"], per_advisory["unique_recipients"], per_advisory["duplicates"]) == (
        1200,
        1200,
        0,
    )
    async with aiohttp.ClientSession(gateway.public_url, headers=await bearer(gateway)) as http:
        async with http.get(f"/advisories/{record['id']}/status") as resp:
            assert await resp.json() == {
                "advisory_id": record["id"],
                "by_channel": {"push": {"delivered": 1200}},
                "segments": [],  # no partner-side segments in this audience
            }
        async with http.get("/advisories/no-such-advisory/status") as resp:
            assert resp.status == 404
            assert (await resp.json(content_type="application/problem+json"))["field"] == "advisory_id"
        async with http.get("/metrics") as resp:
            metrics = await resp.text()
    accepted = next(
        line
        for line in metrics.splitlines()
        if line.startswith('gateway_channel_messages_total{channel="push",outcome="accepted"}')
    )
    assert float(accepted.rsplit(" ", 1)[1]) >= 1200


async def test_recipients_outside_the_audience_are_not_notified(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    await load_recipients(gateway, tmp_path, 40, country="XA")
    path = tmp_path / "elsewhere.csv"
    path.write_text("id,app_user,country,tags\nz1,app-z1,XB,\nz2,app-z2,XB,consular-list\n", encoding="utf-8")
    assert gateway.store is not None
    await import_file(gateway.store, path)
    record = signed(advisory(audience={"countries": ["XA"]}))
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)
    await eventually(lambda: reached(gateway, record["id"], "delivered", 40))

    by_tag = signed(advisory(audience={"tags": ["consular-list"]}))
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, by_tag)
    await eventually(lambda: reached(gateway, by_tag["id"], "delivered", 1))
    stats = (await sandbox.stats())["channels"]["push"]["by_advisory"]
    assert stats[f"{record['id']}@v1"]["unique_recipients"] == 40
    assert stats[f"{by_tag['id']}@v1"]["unique_recipients"] == 1


async def test_each_recipient_gets_the_first_language_of_their_chain(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    """Chains kk|ru, ru, en, de|en → kk, ru, en, en (no German template: the chain falls through)."""
    await load_recipients(gateway, tmp_path, 8)
    record = signed(advisory())
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)
    await eventually(lambda: reached(gateway, record["id"], "delivered", 8))
    stats = (await sandbox.stats())["channels"]["push"]["by_advisory"][f"{record['id']}@v1"]
    assert stats["languages"] == {"en": 4, "kk": 2, "ru": 2}


async def test_malformed_records_go_to_the_dead_letter_topic_and_the_service_keeps_going(
    gateway: Gateway, tmp_path: Path
) -> None:
    await load_recipients(gateway, tmp_path, 10)
    topic = gateway.settings.kafka.topic_advisories
    bad = {
        "not json": b"{this is not json",
        "schema": json.dumps(signed(advisory(severity="apocalyptic"))).encode(),
        "unknown template": json.dumps(signed(advisory(template="no-such-template"))).encode(),
        "expired": json.dumps(
            signed(advisory(issued_at="2020-01-01T00:00:00Z", expires_at="2020-01-02T00:00:00Z"))
        ).encode(),
        "missing language": json.dumps(
            signed(advisory(template=None, data={}, content={"kk": {"title": "Т", "body": "Б"}}))
        ).encode(),
        "forged": json.dumps(
            {**signed(advisory()), "channels": ["push"], "data": {"hotline": "+1 evil"}}
        ).encode(),
        "unsigned": json.dumps(advisory()).encode(),
    }
    producer = kafka.producer(gateway.bootstrap_servers)
    await producer.start()
    try:
        for raw in bad.values():
            await producer.send_and_wait(topic, raw, key=b"bad")
    finally:
        await producer.stop()
    good = signed(advisory())
    await publish(gateway.bootstrap_servers, topic, good)

    dead = await read_topic(gateway.bootstrap_servers, gateway.settings.kafka.topic_dlq, len(bad))
    reasons = {bytes(msg.value): dict(msg.headers) for msg in dead}
    assert set(reasons) == set(bad.values()), "every bad record is dead-lettered with its original bytes"
    by_case = {case: reasons[raw] for case, raw in bad.items()}
    assert by_case["not json"][("error")] == b"decode"
    assert b"severity" in by_case["schema"]["reason"]
    assert b"no-such-template" in by_case["unknown template"]["reason"]
    assert by_case["expired"]["error"] == b"expired"
    assert b"'en'" in by_case["missing language"]["reason"]
    assert by_case["forged"]["error"] == b"signature"
    assert b"missing" in by_case["unsigned"]["reason"]
    await eventually(
        lambda: reached(gateway, good["id"], "delivered", 10), what="the good advisory after the bad"
    )


async def test_a_batch_that_fails_its_crc_is_dead_lettered_by_its_place_and_intake_reads_on(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch damaged between its producer and the broker: the embedded broker (Tansu) stores it
    without checking its CRC, and the Kafka client refuses it on every fetch. Intake used to stop
    there (its loop raised, the gateway exited, and met the same batch at each restart); now each
    offset it cannot read goes to the dead-letter topic with no bytes, its place and the reason, and
    the advisory behind it is read."""
    await load_recipients(gateway, tmp_path, 10)
    topic = gateway.settings.kafka.topic_advisories
    real = message_accumulator.MessageBatch.get_data_buffer

    def damaged(batch: message_accumulator.MessageBatch) -> Any:
        data = real(batch)
        if batch.tp.topic != topic:
            return data
        raw = bytearray(data.getvalue() if hasattr(data, "getvalue") else data)
        raw[-3] ^= 0xFF  # a byte of the last record's value: the batch's CRC no longer matches
        return io.BytesIO(bytes(raw)) if hasattr(data, "getvalue") else bytes(raw)

    # in the last partition: the error names none, and the others are asked first
    last = gateway.settings.kafka.partitions - 1
    outside = AIOKafkaProducer(
        bootstrap_servers=gateway.bootstrap_servers, enable_idempotence=False, linger_ms=50
    )
    await outside.start()
    try:
        lost = [signed(advisory()), signed(advisory())]  # two records in the one damaged batch
        with monkeypatch.context() as m:
            m.setattr(message_accumulator.MessageBatch, "get_data_buffer", damaged)
            sending = [
                await outside.send(topic, json.dumps(a).encode(), key=b"k", partition=last) for a in lost
            ]
            offsets = [(await s).offset for s in sending]
        good = signed(advisory())
        await outside.send_and_wait(topic, json.dumps(good).encode(), key=b"k", partition=last)
    finally:
        await outside.stop()

    await eventually(lambda: reached(gateway, good["id"], "delivered", 10), what="the advisory after it")
    dead = await read_topic(gateway.bootstrap_servers, gateway.settings.kafka.topic_dlq, 2)
    # (the dead-letter topic's partitions are read in no set order)
    assert sorted(dict(d.headers)["source"] for d in dead) == [
        f"{topic}/{last}/{o}".encode() for o in offsets
    ]
    for d in dead:
        assert dict(d.headers)["error"] == b"unreadable"
        assert b"CorruptRecord" in dict(d.headers)["reason"]
        assert d.value == b""  # the client could not read its bytes
    for a in lost:
        assert await gateway.store.advisory(a["id"], 1) is None  # never read, so never sent


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_an_advisory_compressed_by_its_producer_is_read_and_the_gateways_own_records_are_compressed(
    gateway: Gateway, tmp_path: Path, codec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A press office's producer may compress its batches with any codec Kafka defines: intake reads
    them all (without the codecs' library aiokafka refused such a batch, which ended intake's loop
    and with it the gateway, again at each restart). The gateway compresses what it produces
    (``kafka.compression``, zstd), and a consumer reads it back."""
    await load_recipients(gateway, tmp_path, 10)
    outside = AIOKafkaProducer(
        bootstrap_servers=gateway.bootstrap_servers, enable_idempotence=False, compression_type=codec
    )
    await outside.start()
    try:
        record = signed(advisory())
        raw = json.dumps(record).encode()
        await outside.send_and_wait(gateway.settings.kafka.topic_advisories, raw, key=record_key(record))
    finally:
        await outside.stop()
    await eventually(lambda: reached(gateway, record["id"], "delivered", 10), what="10 delivered")

    # the delivery events as a consumer fetches them, with each fetched batch's codec noted
    codecs: list[int] = []
    real = fetcher.MemoryRecords

    class Noted:
        def __init__(self, data: bytes) -> None:
            self._records = real(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._records, name)

        def next_batch(self) -> Any:
            batch = self._records.next_batch()
            if batch is not None:
                codecs.append(batch.compression_type)
            return batch

    monkeypatch.setattr(fetcher, "MemoryRecords", Noted)
    topic = gateway.settings.kafka.topic_events
    events = await read_topic(gateway.bootstrap_servers, topic, 30, items=events_in)
    mine = [e["status"] for e in events if e["advisory_id"] == record["id"]]
    assert sorted(mine) == ["delivered"] * 10 + ["queued"] * 10 + ["sent"] * 10
    assert gateway.settings.kafka.compression == "zstd"  # the default
    assert set(codecs) == {DefaultRecordBatch.CODEC_ZSTD}  # one batch at least, each zstd


async def test_receipt_with_a_bad_signature_is_refused_and_changes_nothing(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    await sandbox.point_at(None)  # hold the sandbox's own receipts
    await load_recipients(gateway, tmp_path, 3)
    record = signed(advisory())
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)
    await eventually(lambda: reached(gateway, record["id"], "sent", 3))
    assert gateway.store is not None
    store = gateway.store
    did = (await store.delivery_of(record["id"], 1, "r00000", "push") or {})["id"]
    body = json.dumps({"receipts": [{"idempotency_key": did, "status": "delivered"}]}).encode()
    url = f"{gateway.public_url}/receipts/push"
    async with aiohttp.ClientSession() as http:
        forged = {"Content-Type": "application/json", **hmac_headers("not-the-secret", body)}
        async with http.post(url, data=body, headers=forged) as resp:
            assert resp.status == 401
            assert resp.content_type == "application/problem+json"
        async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 401
    assert (await store.delivery(did) or {}).get("status") == "sent"


async def test_duplicate_and_out_of_order_receipts_are_harmless(
    gateway: Gateway, sandbox: SandboxProcess, secret: str, tmp_path: Path
) -> None:
    await sandbox.point_at(None)
    await load_recipients(gateway, tmp_path, 2)
    record = signed(advisory())
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)
    await eventually(lambda: reached(gateway, record["id"], "sent", 2))
    assert gateway.store is not None
    store = gateway.store
    first, second = [
        (await store.delivery_of(record["id"], 1, f"r0000{i}", "push") or {})["id"] for i in range(2)
    ]
    url = f"{gateway.public_url}/receipts/push"

    async def post(receipts: list[dict[str, str]]) -> int:
        body = json.dumps({"receipts": receipts}).encode()
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                url, data=body, headers={"Content-Type": "application/json", **hmac_headers(secret, body)}
            ) as resp,
        ):
            return resp.status

    # read arrives before delivered; then delivered twice; then a late "failed"
    assert await post([{"idempotency_key": first, "status": "read"}]) == 200
    assert await post([{"idempotency_key": first, "status": "delivered"}]) == 200
    assert await post([{"idempotency_key": second, "status": "delivered"}] * 2) == 200
    assert await post([{"idempotency_key": second, "status": "failed"}]) == 200
    assert (await store.delivery(first) or {}).get("status") == "read"
    assert (await store.delivery(second) or {}).get("status") == "delivered"
    # each delivery: queued, sent (2 events each), then only the two receipts that moved one
    events = await read_topic(
        gateway.bootstrap_servers, gateway.settings.kafka.topic_events, 6, items=events_in
    )
    moved = sorted((e["delivery_id"], e["status"]) for e in events if e["previous_status"] == "sent")
    assert moved == sorted([(first, "read"), (second, "delivered")])
