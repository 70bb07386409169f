"""Weighted provider routing: demotion on errors and slow receipts, hysteresis, drift back."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from channels.base import Message, Receipt, Result
from channels.routing import HealthSettings, RoutedSettings, RoutedSmsAdapter, Router
from gateway.app import Gateway
from gateway.cli import publish
from gateway.models import Status, now
from gateway.sandbox.process import SandboxProcess
from tests.conftest import advisory, bearer, eventually, load_recipients, make_settings, reached, signed


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


HEALTH = HealthSettings(adjust_every_s=10, smoothing=0.5)


def _router(clock: Clock) -> Router:
    return Router({"a": 70, "b": 30}, HEALTH, clock, random.Random(1))


def _results(n: int, outcome: str = "accepted", prefix: str = "m") -> list[Result]:
    return [Result(f"{prefix}{i}", outcome) for i in range(n)]  # type: ignore[arg-type]


def test_traffic_follows_the_resting_weights() -> None:
    router = _router(Clock())
    share = Counter(router.choose() for _ in range(2000))
    assert 0.65 < share["a"] / 2000 < 0.75


def test_a_failing_provider_is_demoted_and_stays_down_inside_the_hysteresis_band() -> None:
    clock = Clock()
    router = _router(clock)
    for _ in range(4):
        router.sent("a", _results(10, "retry"))
    clock.t = 11
    router.choose()
    assert router.weights() == {"a": 70 * 0.25, "b": 30}
    # errors fall to ~10 %: below "demote" (20 %) but above "recover" (5 %): no drift back yet
    for _ in range(6):
        router.sent("a", _results(9) + _results(1, "retry", "r"))
    clock.t = 22
    router.choose()
    assert 0.05 < router.providers["a"].error_rate < 0.2
    assert router.weights()["a"] == 70 * 0.25


def test_a_recovered_provider_drifts_back_to_its_resting_weight_step_by_step() -> None:
    clock = Clock()
    router = _router(clock)
    router.sent("a", _results(10, "retry"))
    clock.t = 11
    router.choose()
    seen = []
    for step in range(2, 12):
        for _ in range(6):
            router.sent("a", _results(10))
        clock.t = 11 * step
        router.choose()
        seen.append(router.weights()["a"])
    assert seen[0] == pytest.approx(17.5 + 7)
    assert seen == sorted(seen), "it only climbs"
    assert seen[-1] == 70
    assert not router.providers["a"].demoted


def test_slow_receipts_demote_a_provider() -> None:
    clock = Clock()
    router = _router(clock)
    router.sent("b", _results(5))
    clock.t = 300  # receipts 300 s after sending; slow_receipt_s is 120
    router.receipts([Receipt(f"m{i}", Status.DELIVERED) for i in range(5)])
    clock.t = 311
    router.choose()
    assert router.weights()["b"] == pytest.approx(30 * 0.25)
    assert router.weights()["a"] == 70


def _sms(i: int) -> Message:
    return Message(
        f"k{i}", "+77011234567", {"body": "Leave now"}, "en", "adv", 1, 0, now() + timedelta(hours=1)
    )


async def test_the_routed_adapter_moves_traffic_off_a_failing_aggregator(secret: str) -> None:
    async with (
        SandboxProcess(secret) as good,
        SandboxProcess(secret) as bad,
        aiohttp.ClientSession() as session,
    ):
        await bad.faults("sms-http", status=503, count=-1)
        settings = RoutedSettings(
            adapter="sms-routed",
            providers={
                "bad": {"adapter": "sms-http", "weight": 50, "base_url": bad.url, "secret": secret},
                "good": {"adapter": "sms-http", "weight": 50, "base_url": good.url, "secret": secret},
            },
            health=HealthSettings(adjust_every_s=0.001, smoothing=0.5),
        )
        adapter = RoutedSmsAdapter("sms", settings, session)
        outcomes = [(await adapter.send([_sms(i)]))[0].outcome for i in range(60)]
        bad_requests = (await bad.stats())["channels"]["sms-http"]["requests"]
        good_accepted = (await good.stats())["channels"]["sms-http"]["accepted"]
    assert adapter.router.providers["bad"].demoted
    assert bad_requests < 20, "after a few failures the failing aggregator gets little traffic"
    assert good_accepted == outcomes.count("accepted") > 40


async def test_a_routed_sms_broadcast_is_delivered_through_both_providers_with_receipts(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path, secret: str
) -> None:
    """A gateway whose ``sms`` channel routes between two aggregators; each sends DLRs to its own path."""
    async with SandboxProcess(secret) as second:
        routed = {
            "adapter": "sms-routed",
            "providers": {
                "one": {
                    "adapter": "sms-http",
                    "weight": 50,
                    "base_url": sandbox.url,
                    "secret": secret,
                    "burst": 10,
                },
                "two": {
                    "adapter": "sms-http",
                    "weight": 50,
                    "base_url": second.url,
                    "secret": secret,
                    "burst": 10,
                },
            },
        }
        settings = make_settings(
            tmp_path, kafka_bootstrap, sandbox, GATEWAY__CHANNELS__SMS=json.dumps(routed)
        )
        gw = Gateway(settings)
        await gw.start()
        try:
            await sandbox.configure("sms-http", receipt_url=f"{gw.public_url}/receipts/sms/one")
            await second.configure("sms-http", receipt_url=f"{gw.public_url}/receipts/sms/two")
            await load_recipients(gw, tmp_path, 200, reach="phone", languages="ru")
            record = signed(advisory(channels=["sms"]))
            await publish(gw.bootstrap_servers, settings.kafka.topic_advisories, record)

            await eventually(
                lambda: reached(gw, record["id"], "delivered", 200, "sms"),
                what="200 SMS delivered through two providers",
            )
            # the operations room shows each provider's health beside the channel's
            headers = await bearer(gw, "operator")
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{gw.public_url}/console/", headers=headers) as r,
            ):
                room = await r.text()
            assert all(f'data-channel="{name}"' in room for name in ("sms", "sms/one", "sms/two")), room[
                -3000:
            ]
        finally:
            await gw.stop()
        counted = [(await sb.stats())["channels"]["sms-http"] for sb in (sandbox, second)]
    assert sum(c["accepted"] for c in counted) == 200
    assert all(c["accepted"] > 0 for c in counted), "both providers carried traffic"
    assert all(c["duplicates"] == 0 for c in counted)
