"""Several providers behind one channel, with weighted routing that follows their health.

Each batch goes to one provider, drawn by current weight. A provider is **demoted** (its weight cut
by ``demote_factor``, never below ``min_weight``) when its error rate or its receipt latency
(exponentially weighted) passes the demote threshold; it **drifts back** towards its resting weight
by ``drift_step`` of it per adjustment only once both are below the lower recover thresholds —
the gap between the two thresholds is the hysteresis that stops a provider flapping. A provider
that is never sent anything learns nothing; its weight only drifts back.

``sms-routed`` routes SMS among any SMS adapters (``sms-http`` today); receipts come to
``/receipts/<channel>/<provider>``.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from channels import registry
from channels.base import Adapter, ChannelSettings, Message, Receipt, Result, load_settings
from channels.sms import SmsAdapter
from gateway.errors import ConfigError
from gateway.logging import get_logger
from gateway.models import Advisory

log = get_logger(__name__)

LATENCY_MEMORY = 200_000  # sent messages remembered for receipt latency (oldest forgotten first)


class HealthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    demote_error_rate: float = Field(0.2, gt=0, le=1)
    recover_error_rate: float = Field(0.05, ge=0, le=1)
    slow_receipt_s: float = Field(120.0, gt=0)
    recover_receipt_s: float = Field(60.0, gt=0)
    demote_factor: float = Field(0.25, gt=0, lt=1)
    drift_step: float = Field(0.1, gt=0, le=1)
    min_weight: float = Field(1.0, ge=0)
    smoothing: float = Field(0.3, gt=0, le=1)  # weight of the newest observation in the averages
    adjust_every_s: float = Field(10.0, gt=0)


@dataclass
class ProviderHealth:
    name: str
    resting_weight: float
    weight: float
    error_rate: float = 0.0
    receipt_s: float = 0.0
    demoted: bool = False

    def observe_batch(self, errors: int, total: int, smoothing: float) -> None:
        if total:
            self.error_rate += smoothing * (errors / total - self.error_rate)

    def observe_receipt(self, seconds: float, smoothing: float) -> None:
        self.receipt_s += smoothing * (seconds - self.receipt_s)

    def adjust(self, h: HealthSettings) -> str | None:
        """Apply one adjustment; returns "demoted" or "recovered" when that changed, else None."""
        if self.error_rate > h.demote_error_rate or self.receipt_s > h.slow_receipt_s:
            self.weight = max(h.min_weight, self.weight * h.demote_factor)
            was, self.demoted = self.demoted, True
            return None if was else "demoted"
        if self.demoted and self.error_rate <= h.recover_error_rate and self.receipt_s <= h.recover_receipt_s:
            self.weight = min(self.resting_weight, self.weight + h.drift_step * self.resting_weight)
            if self.weight >= self.resting_weight:
                self.demoted = False
                return "recovered"
        return None


class ProviderSettings(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    adapter: str
    weight: float = Field(gt=0)


class RoutedSettings(ChannelSettings):
    providers: dict[str, dict[str, Any]] = Field(min_length=1)
    health: HealthSettings = HealthSettings()


class Router:
    """Weighted choice among providers, adjusted by their health (no I/O: testable alone)."""

    def __init__(
        self,
        weights: Mapping[str, float],
        health: HealthSettings,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.health = health
        self.clock = clock
        self.rng = rng or random.Random()
        self.providers = {n: ProviderHealth(n, w, w) for n, w in weights.items()}
        self._last_adjust = clock()
        self._sent: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def choose(self, available: Sequence[str] | None = None) -> str:
        """A provider drawn by weight among ``available`` (default: all; an empty list: all too)."""
        self._maybe_adjust()
        names = [n for n in self.providers if available is None or n in available] or list(self.providers)
        return self.rng.choices(names, [self.providers[n].weight for n in names])[0]

    def sent(self, provider: str, results: Sequence[Result]) -> None:
        # a retry is the provider failing; a rejection is the message's own fault (a bad number)
        errors = sum(1 for r in results if r.outcome == "retry")
        self.providers[provider].observe_batch(errors, len(results), self.health.smoothing)
        at = self.clock()
        for r in results:
            if r.outcome == "accepted":
                self._sent[r.delivery_id] = (provider, at)
        while len(self._sent) > LATENCY_MEMORY:
            self._sent.popitem(last=False)

    def receipts(self, receipts: Sequence[Receipt]) -> None:
        now = self.clock()
        for r in receipts:
            sent = self._sent.pop(r.delivery_id, None)
            if sent is not None:
                self.providers[sent[0]].observe_receipt(now - sent[1], self.health.smoothing)

    def _maybe_adjust(self) -> None:
        if self.clock() - self._last_adjust < self.health.adjust_every_s:
            return
        self._last_adjust = self.clock()
        for p in self.providers.values():
            change = p.adjust(self.health)
            if change:
                log.warning(
                    f"channel.provider_{change}",
                    provider=p.name,
                    weight=round(p.weight, 2),
                    error_rate=round(p.error_rate, 3),
                    receipt_s=round(p.receipt_s, 1),
                )

    def weights(self) -> dict[str, float]:
        return {n: p.weight for n, p in self.providers.items()}


class RoutedSmsAdapter(SmsAdapter):
    """SMS through several providers (``providers: {name: {adapter, weight, …its settings}}``)."""

    name = "sms-routed"
    max_batch = 100
    settings_model = RoutedSettings

    def __init__(
        self,
        channel: str,
        settings: ChannelSettings,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        routed = cast(RoutedSettings, settings)
        self.providers: dict[str, SmsAdapter] = {}
        weights: dict[str, float] = {}
        for pname, raw in routed.providers.items():
            where = f"{channel}.providers.{pname}"
            spec = load_settings(ProviderSettings, where, raw)
            cls = registry.adapter_class(spec.adapter)
            if not issubclass(cls, SmsAdapter):
                raise ConfigError(f"channels.{where}.adapter: {spec.adapter!r} is not an SMS adapter")
            own = {k: v for k, v in raw.items() if k != "weight"}
            provider = cls(
                f"{channel}/{pname}", load_settings(cls.settings_model, where, own), session, clock
            )
            self.providers[pname] = provider
            weights[pname] = spec.weight
        # the channel's own rate and in-flight limits apply on top of each provider's
        super().__init__(channel, settings, session, clock)
        self.batch_size = min(self.batch_size, *(p.batch_size for p in self.providers.values()))
        self.router = Router(weights, routed.health, clock)

    def check_rendering(self, rendered: Mapping[str, str], adv: Advisory) -> None:
        for provider in self.providers.values():
            provider.check_rendering(rendered, adv)

    async def _send(self, batch: Sequence[Message]) -> list[Result]:
        # a provider whose circuit is open is passed over; if every one is, the batch waits for one
        name = self.router.choose([n for n, p in self.providers.items() if p.circuit.allows_now])
        results = await self.providers[name].send(batch)
        self.router.sent(name, results)
        return results

    def for_receipts(self, provider: str | None) -> Adapter:
        if provider is None or provider not in self.providers:
            raise KeyError(provider)
        return self.providers[provider]

    def receipts_seen(self, receipts: Sequence[Receipt]) -> None:
        self.router.receipts(receipts)

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()
