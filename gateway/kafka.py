"""Kafka clients as the gateway uses them: topics, a producer, consumers with manual commits."""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

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


async def ensure_topics(bootstrap_servers: str, settings: KafkaSettings, channels: Iterable[str]) -> None:
    """Create the gateway's topics (for these channels) where they do not exist yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics_of(settings, channels) if t not in existing]
        if missing:
            response = await admin.create_topics([NewTopic(t, settings.partitions, 1) for t in missing])
            for topic, code, message in response.topic_errors:
                if code not in (0, TOPIC_EXISTS):
                    raise RuntimeError(f"cannot create topic {topic}: {message} (error {code})")
            log.info("kafka.topics_created", topics=missing)
    finally:
        await admin.close()


def producer(bootstrap_servers: str) -> AIOKafkaProducer:
    # acks=all for durability; no idempotent producer (Tansu does not support it): the
    # consumers dedupe by key instead.
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=False, linger_ms=5
    )


def consumer(
    bootstrap_servers: str, topics: list[str], group: str, settings: KafkaSettings
) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(500, settings.session_timeout_ms // 4),
        max_poll_records=64,
    )
