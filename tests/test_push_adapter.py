"""The push adapter against the sandbox partner over real HTTP, healthy and failing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import aiohttp
import orjson
import pytest_asyncio

from channels.base import Message, hmac_headers
from channels.push import PushAdapter, PushSettings
from gateway.models import now
from gateway.sandbox.process import SandboxProcess


@pytest_asyncio.fixture
async def adapter(sandbox: SandboxProcess, secret: str) -> AsyncIterator[PushAdapter]:
    async with aiohttp.ClientSession() as session:
        settings = PushSettings(adapter="push", base_url=sandbox.url, secret=secret, timeout_s=1.0)
        yield PushAdapter("push", settings, session)


def _messages(n: int, prefix: str = "m") -> list[Message]:
    exp = now() + timedelta(hours=1)
    return [
        Message(f"{prefix}{i}", f"user-{i}", {"title": "Leave", "body": "Go north"}, "en", "adv", 1, 0, exp)
        for i in range(n)
    ]


async def test_a_batch_is_accepted_with_partner_ids(adapter: PushAdapter) -> None:
    results = await adapter.send(_messages(3))
    assert [r.outcome for r in results] == ["accepted"] * 3
    assert all(r.partner_id for r in results)


async def test_a_replayed_idempotency_key_is_not_a_second_notification(
    adapter: PushAdapter, sandbox: SandboxProcess
) -> None:
    first = await adapter.send(_messages(2))
    again = await adapter.send(_messages(2))
    assert [r.partner_id for r in again] == [r.partner_id for r in first]
    stats = (await sandbox.stats())["channels"]["push"]
    assert (stats["accepted"], stats["idempotent_replays"], stats["duplicates"]) == (2, 2, 0)


async def test_503_and_429_are_retried_and_retry_after_is_passed_on(
    adapter: PushAdapter, sandbox: SandboxProcess
) -> None:
    await sandbox.faults(status=503, count=1)
    assert {r.outcome for r in await adapter.send(_messages(2))} == {"retry"}
    await sandbox.faults(status=429, count=1, retry_after=7)
    results = await adapter.send(_messages(2))
    assert {(r.outcome, r.retry_after) for r in results} == {("retry", 7.0)}
    assert {r.outcome for r in await adapter.send(_messages(2))} == {"accepted"}


async def test_a_partner_that_hangs_is_a_retry_after_the_timeout(
    adapter: PushAdapter, sandbox: SandboxProcess
) -> None:
    await sandbox.faults(hang=True, count=1)
    results = await adapter.send(_messages(1))
    assert results[0].outcome == "retry"
    assert "unreachable" in (results[0].reason or "")


async def test_a_wrong_secret_is_a_permanent_rejection(sandbox: SandboxProcess) -> None:
    async with aiohttp.ClientSession() as session:
        settings = PushSettings(adapter="push", base_url=sandbox.url, secret="wrong")
        results = await PushAdapter("push", settings, session).send(_messages(1))
    assert results[0].outcome == "rejected"
    assert "401" in (results[0].reason or "")


async def test_no_more_than_max_in_flight_requests_are_open_at_the_partner(
    sandbox: SandboxProcess, secret: str
) -> None:
    await sandbox.faults(latency_s=0.2, count=-1)
    async with aiohttp.ClientSession() as session:
        settings = PushSettings(adapter="push", base_url=sandbox.url, secret=secret, max_in_flight=2)
        adapter = PushAdapter("push", settings, session)
        results = await asyncio.gather(*(adapter.send(_messages(1, prefix=f"b{i}-")) for i in range(6)))
    assert all(r[0].outcome == "accepted" for r in results)
    assert (await sandbox.stats())["channels"]["push"]["most_open_requests"] == 2


async def test_the_sandbox_counts_a_mixed_batch_exactly(sandbox: SandboxProcess, secret: str) -> None:
    """One batch with two advisories, a second message to a recipient, a malformed one and a replay:
    each answered in order, and the partner's counts say what a citizen's phone would show."""

    def msg(key: str, user: str, advisory: str, **over: object) -> dict[str, object]:
        m = {"idempotency_key": key, "user_ref": user, "title": "Leave", "body": "Go north", "language": "kk"}
        return {**m, "advisory_id": advisory, "advisory_version": 1, **over}

    batch = [
        msg("a/1", "u1", "a"),
        msg("a/2", "u2", "a"),
        msg("a/3", "u3", "a", body=""),
        msg("b/1", "u1", "b", language="ru"),
        msg("a/1-again", "u1", "a"),  # a second notification to u1 for advisory a: a duplicate
        msg("a/1", "u1", "a"),  # the same key: a replay, answered with the first id, not counted
    ]
    body = orjson.dumps({"messages": batch})
    async with aiohttp.ClientSession() as http:
        headers = {"Content-Type": "application/json", **hmac_headers(secret, body)}
        async with http.post(f"{sandbox.url}/v1/messages:batch", data=body, headers=headers) as resp:
            assert resp.status == 200
            results = (await resp.json())["results"]
    assert [(r["idempotency_key"], r["status"]) for r in results] == [
        ("a/1", "accepted"),
        ("a/2", "accepted"),
        ("a/3", "rejected"),
        ("b/1", "accepted"),
        ("a/1-again", "accepted"),
        ("a/1", "accepted"),
    ]
    assert results[5]["message_id"] == results[0]["message_id"]
    assert len({r.get("message_id") for r in results[:5]} - {None}) == 4
    stats = (await sandbox.stats())["channels"]["push"]
    a, b = stats["by_advisory"]["a@v1"], stats["by_advisory"]["b@v1"]
    assert (a["accepted"], a["unique_recipients"], a["duplicates"], a["languages"]) == (3, 2, 1, {"kk": 3})
    assert (b["accepted"], b["unique_recipients"], b["duplicates"], b["languages"]) == (1, 1, 0, {"ru": 1})
    assert (stats["accepted"], stats["unique_recipients"], stats["duplicates"]) == (4, 2, 1)
    assert (stats["idempotent_replays"], stats["rejected"]) == (1, 1)
    later = (await sandbox.stats(since=a["last_at"]))["channels"]["push"]["by_advisory"]["a@v1"]
    earlier = (await sandbox.stats(since=a["first_at"] - 1))["channels"]["push"]["by_advisory"]["a@v1"]
    assert (later["accepted_since"], earlier["accepted_since"]) == (0, 3)
