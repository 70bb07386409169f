"""The composition root: the only place that wires settings, store, broker, adapters and loops.

``Gateway.start()`` brings up what the configured roles need; ``stop()`` finishes in-flight work
(the loops end after their current batch and commit), then closes everything in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from channels import registry
from channels.base import Adapter, load_settings
from gateway import kafka, metrics
from gateway.api import build_app
from gateway.auth import Tokens
from gateway.broker import EmbeddedBroker
from gateway.cascade import Cascade
from gateway.console import Console
from gateway.dispatch import Dispatcher
from gateway.errors import ConfigError
from gateway.events import Publisher
from gateway.feed import Feed
from gateway.intake import Intake
from gateway.logging import get_logger
from gateway.models import BULK, URGENT, Advisory, Reachable
from gateway.planner import Planner
from gateway.receipts import ReceiptWebhook
from gateway.rendering import Renderer
from gateway.segments import SegmentSender, segment_rows
from gateway.settings import Settings
from gateway.signing import Verifier
from gateway.store import Store
from gateway.submissions import ROLES as SUBMISSION_ROLES
from gateway.submissions import Submissions
from gateway.sweeper import Sweeper
from gateway.training import Training

log = get_logger(__name__)


def _language_of(
    renderer: Renderer, adapters: Mapping[str, Adapter], adv: Advisory, r: Reachable, channel: str
) -> str:
    """The language dispatch will render ``r``'s message on ``channel`` in (counted from planning)."""
    adapter = adapters.get(channel)
    if adapter is None:
        return ""
    return renderer.choose_language(adv, r, adapter.kind, adapter.parts) or ""


def build_adapters(settings: Settings, session: aiohttp.ClientSession) -> dict[str, Adapter]:
    adapters: dict[str, Adapter] = {}
    for channel, raw in settings.channels.items():
        cls = registry.adapter_class(str(raw.get("adapter", channel)))
        channel_settings = load_settings(cls.settings_model, channel, raw)
        opens_at = channel_settings.circuit.failures_to_open
        if opens_at >= settings.dispatch.max_attempts:
            raise ConfigError(
                f"channels.{channel}.circuit.failures_to_open: {opens_at} must be below "
                f"dispatch.max_attempts ({settings.dispatch.max_attempts}), or an outage could use up "
                "a delivery's attempts before the circuit opens"
            )
        if channel_settings.enabled:
            adapters[channel] = cls(channel, channel_settings, session)
    return adapters


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.broker: EmbeddedBroker | None = None
        self.bootstrap_servers = settings.kafka.bootstrap_servers or ""
        self.store: Store | None = None
        self.http_port: int | None = None
        self._session: aiohttp.ClientSession | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumers: list[AIOKafkaConsumer] = []
        self._groups: dict[str, AIOKafkaConsumer] = {}  # consumer group -> this instance's consumer
        self._tasks: list[asyncio.Task[Any]] = []
        self._runner: web.AppRunner | None = None
        self.adapters: dict[str, Adapter] = {}
        self.dispatcher: Dispatcher | None = None
        self.tokens: Tokens | None = None
        self.training: Training | None = None
        self.console: Console | None = None

    async def start(self) -> None:
        """Bring up what the roles need; if any part fails, close what was opened and re-raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop(drain_timeout=1.0)
            raise

    async def _start(self) -> None:
        s = self.settings
        if not self.bootstrap_servers:
            self.broker = EmbeddedBroker()
            await self.broker.start()
            self.bootstrap_servers = self.broker.bootstrap_servers
        webhook_secrets = s.events.secrets()  # a webhook without its secret stops start-up here
        self.store = await Store.open(s.store.url, s.store.migrate)
        await self.store.deliver_events(s.events.enabled)
        await kafka.ensure_topics(self.bootstrap_servers, s.kafka, s.channels)
        self._producer = kafka.producer(self.bootstrap_servers, s.kafka)
        await self._producer.start()
        self._session = aiohttp.ClientSession()
        self.adapters = build_adapters(s, self._session)
        renderer = Renderer(s.rendering.templates_path(), s.rendering.default_language)
        kinds = {name: a.kind for name, a in self.adapters.items()}
        routes: list[web.RouteDef] = []
        loops: list[
            tuple[
                str, AIOKafkaConsumer, Callable[[AIOKafkaConsumer, asyncio.Event], Coroutine[Any, Any, None]]
            ]
        ] = []

        planner = Planner(
            self.store,
            self._producer,
            s.kafka,
            s.planner.chunk_size,
            kinds,
            s.planner.poll_s,
            partial(_language_of, renderer, self.adapters),
            lambda adv: segment_rows(adv, renderer, self.adapters),
            s.planner.lease_s,
            s.planner.page_size,
        )
        verifier = Verifier(s.intake.trusted_keys) if s.intake.require_signature else None
        intake = Intake(
            self.store,
            planner,
            renderer,
            verifier,
            self._producer,
            s.kafka.topic_dlq,
            self.adapters,
            s.intake,
            s.approval,
        )
        feed = Feed(self.store, renderer, s.http.public_url)
        routes += feed.routes()
        # the press office's API judges a submission with intake's own checks before the topic
        submissions = Submissions(
            self.store,
            intake,
            self._producer,
            s.kafka.topic_advisories,
            s.api.keys(),
            feed,
            s.api.max_body_bytes,
        )
        routes += submissions.routes()
        self.tokens = Tokens(self.store)
        console = self.console = Console(
            self.store,
            self.tokens,
            intake,
            renderer,
            self.adapters,
            submissions.take,
            sorted(s.api.keys()),
            self.stopping,
        )
        routes += console.routes()
        self._tasks.append(asyncio.create_task(console.run(self.stopping), name="console-trends"))
        if "intake" in s.gateway.roles:
            self._tasks.append(asyncio.create_task(planner.run(self.stopping), name="planner"))
            loops.append(
                ("intake", self._consumer([s.kafka.topic_advisories], s.kafka.intake_group), intake.run)
            )
        if "dispatch" in s.gateway.roles:
            lanes = {
                kafka.deliveries_topic(s.kafka, channel, urgent): (URGENT if urgent else BULK, channel)
                for channel in self.adapters
                for urgent in (True, False)
            }
            store = self.store
            self.training = Training(
                s,
                self._session,
                lambda adapters: ReceiptWebhook(store, adapters),
                lambda: self.public_url,
            )
            routes += self.training.routes()
            dispatcher = self.dispatcher = Dispatcher(
                self.store, renderer, self.adapters, s.dispatch, lanes, self.training, planner.urgent_first
            )
            sweeper = Sweeper(self.store, s.sweeper, approval_timeout_s=s.approval.timeout_s)
            cascade = Cascade(self.store, planner, self.adapters, s.cascade)
            self._tasks.append(asyncio.create_task(sweeper.run(self.stopping), name="sweeper"))
            if s.events.enabled:  # the outbox is shared: processes with dispatch publish it
                publisher = Publisher(
                    self.store, self._producer, s.kafka.topic_events, s.events, webhook_secrets, self._session
                )
                self._tasks.append(asyncio.create_task(publisher.run(self.stopping), name="events"))
            self._tasks.append(asyncio.create_task(cascade.run(self.stopping), name="cascade"))
            segments = SegmentSender(self.store, renderer, self.adapters, s.dispatch)
            planner.segments_planned = segments.wake
            self._tasks.append(asyncio.create_task(segments.run(self.stopping), name="segments"))
            loops.append(("dispatch", self._consumer(list(lanes), s.kafka.dispatch_group), dispatcher.run))
        webhook = ReceiptWebhook(self.store, self.adapters, s.receipts)
        if "receipts" in s.gateway.roles:
            routes += webhook.routes()
        if "receipts" in s.gateway.roles or "dispatch" in s.gateway.roles:  # webhooks, SMPP binds
            self._tasks.append(asyncio.create_task(webhook.run(self.stopping), name="held-receipts"))
        # receipts that come on a session this process holds (SMPP deliver_sm on its binds) are
        # applied here, whatever its roles: the SMSC writes them once, to the bind that sent
        for name, adapter in self.adapters.items():
            adapter.receipt_sink = webhook.sink(name, adapter)
        # joining a consumer group takes the broker's rebalance delay: join them all at once
        await asyncio.gather(*(consumer.start() for _, consumer, _ in loops))
        for name, consumer, run in loops:
            self._tasks.append(asyncio.create_task(run(consumer, self.stopping), name=name))
        if loops:
            self._tasks.append(asyncio.create_task(self._measure_lag(), name="consumer-lag"))

        app = build_app(self.store, routes, self.tokens, SUBMISSION_ROLES, self._producer, self.adapters)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.http.host, s.http.port)
        await site.start()
        self.http_port = int(self._runner.addresses[0][1])
        log.info(
            "gateway.started",
            roles=list(s.gateway.roles),
            bootstrap_servers=self.bootstrap_servers,
            port=self.http_port,
            channels=sorted(self.adapters),
        )

    def _consumer(self, topics: list[str], group: str) -> AIOKafkaConsumer:
        consumer = kafka.consumer(self.bootstrap_servers, topics, group, self.settings.kafka)
        self._consumers.append(consumer)
        self._groups[group] = consumer
        return consumer

    async def _measure_lag(self, every_s: float = 5.0) -> None:
        """``gateway_consumer_lag`` per group: records on this instance's partitions not yet
        consumed (the broker's high-water mark minus the consumer's position)."""
        while not self.stopping.is_set():
            for group, consumer in self._groups.items():
                lag = 0
                with contextlib.suppress(Exception):  # not yet assigned, or a rebalance under way
                    for tp in consumer.assignment():
                        high = consumer.highwater(tp)
                        if high is not None:
                            lag += max(0, high - await consumer.position(tp))
                metrics.consumer_lag.labels(group).set(lag)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), every_s)

    @property
    def public_url(self) -> str:
        return self.settings.http.public_url or f"http://{self.settings.http.host}:{self.http_port}"

    async def wait(self) -> None:
        """Until a loop fails (re-raised) or stop() is called."""
        if not self._tasks:
            await self.stopping.wait()
            return
        stop_waiter = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([*self._tasks, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
        stop_waiter.cancel()
        for task in done:
            if task is not stop_waiter and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Let the loops finish their current batch and commit (dispatch within its own
        ``drain_timeout_s``), then close everything."""
        if drain_timeout is None:
            drain_timeout = self.settings.dispatch.drain_timeout_s + 5.0
        self.stopping.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        for consumer in self._consumers:
            with contextlib.suppress(Exception):
                await consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        for adapter in self.adapters.values():
            await adapter.close()
        if self.training is not None:
            await self.training.close()
        if self._session is not None:
            await self._session.close()
        if self.store is not None:
            await self.store.close()
        if self.broker is not None:
            await self.broker.stop()
        log.info("gateway.stopped")
