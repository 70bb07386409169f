"""Kafka clients as the gateway uses them: topics, a producer, consumers with manual commits — each
with the same connection options (TLS, SASL: ``client_options``) for a managed cluster."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.helpers import create_ssl_context

from gateway.errors import ConfigError
from gateway.logging import get_logger
from gateway.settings import KafkaSettings

log = get_logger(__name__)

TOPIC_EXISTS = 36


def deliveries_topic(settings: KafkaSettings, channel: str, urgent: bool) -> str:
    """Where one channel's chunks of one priority go: ``deliveries.push``, ``deliveries.urgent.sms-http``.
    A topic per channel lets dispatch pause a slow channel's intake without holding the others."""
    return f"{settings.topic_deliveries_urgent if urgent else settings.topic_deliveries}.{channel}"


def topics_of(settings: KafkaSettings, channels: Iterable[str]) -> list[str]:
    return [
        settings.topic_advisories,
        *(deliveries_topic(settings, c, urgent) for c in channels for urgent in (True, False)),
        settings.topic_events,
        settings.topic_dlq,
    ]


def client_options(settings: KafkaSettings | None) -> dict[str, Any]:
    """What every client (producer, consumer, admin) is given to reach the cluster: nothing for a
    plain local broker; TLS and SASL for a managed one (settings validated in KafkaSettings)."""
    if settings is None or settings.security_protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        context = create_ssl_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None,
            certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
            keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        )
        context.check_hostname = settings.ssl_check_hostname
        options["ssl_context"] = context
    if settings.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_secret()
    return options


async def ensure_topics(bootstrap_servers: str, settings: KafkaSettings, channels: Iterable[str]) -> None:
    """Create the gateway's topics (for these channels) where they do not exist yet — or, with
    ``create_topics: false`` (a managed cluster's topics are made by its owners), refuse to start
    naming the missing ones. Either way every topic must have at least ``partitions`` partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_options(settings))
    await admin.start()
    try:
        wanted = topics_of(settings, channels)
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing and not settings.create_topics:
            raise ConfigError(
                f"kafka.create_topics is false and these topics do not exist: {', '.join(missing)} "
                f"(create them with {settings.partitions} partitions, or set kafka.create_topics: true)"
            )
        if missing:
            response = await admin.create_topics([NewTopic(t, settings.partitions, 1) for t in missing])
            for topic, code, message in response.topic_errors:
                if code not in (0, TOPIC_EXISTS):
                    raise RuntimeError(f"cannot create topic {topic}: {message} (error {code})")
            log.info("kafka.topics_created", topics=missing)
        present = [t for t in wanted if t not in missing]
        described = await admin.describe_topics(present)  # (a broker may answer for more topics)
        counts = {d["topic"]: len(d["partitions"]) for d in described if d["topic"] in present}
        few = {t: n for t, n in counts.items() if n < settings.partitions}
        if few:
            detail = ", ".join(f"{t} has {n}" for t, n in sorted(few.items()))
            raise ConfigError(
                f"kafka.partitions is {settings.partitions}, but {detail}: add partitions to those topics "
                "or lower kafka.partitions (consumers cannot share a topic beyond its partitions)"
            )
    finally:
        await admin.close()


def producer(bootstrap_servers: str, settings: KafkaSettings | None = None) -> AIOKafkaProducer:
    # acks=all for durability; no idempotent producer (Tansu does not support it): the
    # consumers dedupe by key instead. Batches compressed as ``kafka.compression`` says.
    codec = settings.compression if settings is not None else KafkaSettings().compression
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        enable_idempotence=False,
        linger_ms=5,
        compression_type=None if codec == "none" else codec,
        **client_options(settings),
    )


def consumer(
    bootstrap_servers: str, topics: list[str], group: str, settings: KafkaSettings
) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        **client_options(settings),
        bootstrap_servers=bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(500, settings.session_timeout_ms // 4),
        max_poll_records=64,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )
