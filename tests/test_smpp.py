"""SMS over SMPP 3.4 against the sandbox SMSC over TCP: encodings, UDH parts, window, keep-alive,
reconnect, and deliver_sm receipts matched back to our deliveries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiosmpplib import NPI, TON, AbstractHook, DeliverSm, PhoneNumber, SmppMessage, SubmitSm, SubmitSmResp

from channels.base import Message, Receipt
from channels.smpp import SmppAdapter, SmppSettings, _Correlator, _Throttle
from gateway.app import Gateway
from gateway.cli import publish
from gateway.models import Status, now
from gateway.sandbox.process import SandboxProcess
from tests.conftest import (
    advisory,
    eventually,
    load_recipients,
    make_settings,
    reached,
    running_gateway,
    signed,
)

KAZAKH = "Елден шығыңыз: өткізу пункті ашық. Консулдық жедел желі: +7 7172 00 00 00. " * 2


class Receipts:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Receipt] = asyncio.Queue()

    async def __call__(self, found: Sequence[Receipt]) -> None:
        for r in found:
            await self.queue.put(r)


@pytest_asyncio.fixture
async def smpp(sandbox: SandboxProcess, secret: str) -> AsyncIterator[tuple[SmppAdapter, Receipts]]:
    async with aiohttp.ClientSession() as session:
        settings = SmppSettings(
            adapter="smpp",
            port=sandbox.smpp_port,
            password=secret[:8],
            window=3,
            enquire_link_s=0.2,
            timeout_s=5,
        )
        adapter = SmppAdapter("smpp", settings, session)
        sink = Receipts()
        adapter.receipt_sink = sink
        yield adapter, sink
        await adapter.close()


def _sms(key: str, to: str, text: str) -> Message:
    return Message(key, to, {"body": text}, "kk", "adv", 1, 0, now() + timedelta(hours=1))


async def _stats(sandbox: SandboxProcess) -> dict[str, object]:
    return dict((await sandbox.stats())["channels"]["smpp"])


async def test_kazakh_in_udh_parts_and_english_in_gsm7_are_accepted_and_receipted(
    smpp: tuple[SmppAdapter, Receipts], sandbox: SandboxProcess
) -> None:
    adapter, receipts = smpp
    results = await adapter.send(
        [_sms("kk1", "+77011234567", KAZAKH), _sms("en1", "+447911123456", "Leave now")]
    )
    assert [r.outcome for r in results] == ["accepted", "accepted"]
    assert all(r.partner_id for r in results)
    stats = await _stats(sandbox)
    assert stats["binds"] == 1
    assert stats["parts"] == 3 + 1  # 150 UCS-2 units → 3 parts of ≤ 67
    assert stats["encodings"] == {"gsm0338": 1, "ucs2": 1}
    assert (stats["unique_recipients"], stats["duplicates"]) == (2, 0)
    got = {}
    async with asyncio.timeout(10):
        while len(got) < 2:
            r = await receipts.queue.get()
            got[r.delivery_id] = (r.status, r.partner_id)
    assert got == {
        "kk1": (Status.DELIVERED, results[0].partner_id),
        "en1": (Status.DELIVERED, results[1].partner_id),
    }, "the last part's receipt speaks for the message"


class HeldSink:
    """A store that takes receipts only once let: what it was given, a call at a time."""

    def __init__(self) -> None:
        self.calls: list[list[Receipt]] = []
        self.let = asyncio.Event()

    async def __call__(self, found: Sequence[Receipt]) -> None:
        self.calls.append(list(found))
        await self.let.wait()


async def _receipts_waiting(sandbox: SandboxProcess, n: int) -> None:
    async def waiting() -> bool:
        stats = await _stats(sandbox)
        return stats["receipts_sent"] == n and stats["receipts_unanswered"] == n

    await eventually(waiting, within=10, what=f"{n} receipts sent and not answered")


async def test_a_receipt_is_answered_once_stored_and_those_that_came_meanwhile_are_stored_together(
    smpp: tuple[SmppAdapter, Receipts], sandbox: SandboxProcess
) -> None:
    """The SMSC keeps a receipt until it is answered, so the answer waits for the store; the
    session reads on meanwhile, and what came during one write is stored by the next, at once."""
    adapter, _ = smpp
    sink = HeldSink()
    adapter.receipt_sink = sink
    results = await adapter.send([_sms(f"r{i}", f"+7701000000{i}", "Leave now") for i in range(5)])
    assert {r.outcome for r in results} == {"accepted"}
    await _receipts_waiting(sandbox, 5)  # all five read by the session while the first is stored
    assert (await _stats(sandbox))["receipts_answered"] == 0
    sink.let.set()

    async def answered() -> bool:
        return (await _stats(sandbox))["receipts_answered"] == 5

    await eventually(answered, within=10, what="every receipt answered once stored")
    # the first write (what had come by then), then everything that came while it waited, at once
    assert len(sink.calls) <= 2
    assert sorted(r.delivery_id for call in sink.calls for r in call) == [f"r{i}" for i in range(5)]


async def test_receipts_not_answered_when_the_link_drops_come_again_after_the_next_bind(
    smpp: tuple[SmppAdapter, Receipts], sandbox: SandboxProcess
) -> None:
    """A crash or a cut link between a deliver_sm and its storing loses nothing: unanswered, it is
    delivered again at the next bind, and stored (twice is harmless: a receipt moves a delivery
    forward once)."""
    adapter, _ = smpp
    sink = HeldSink()
    adapter.receipt_sink = sink
    results = await adapter.send([_sms(f"d{i}", f"+7701000000{i}", "x") for i in range(3)])
    assert {r.outcome for r in results} == {"accepted"}
    await _receipts_waiting(sandbox, 3)
    async with aiohttp.ClientSession() as http, http.post(f"{sandbox.url}/control/smpp/drop") as resp:
        assert (await resp.json())["dropped"] == 1
    sink.let.set()

    async def again() -> bool:
        stats = await _stats(sandbox)
        return stats["binds"] == 2 and stats["receipts_answered"] == 3 and stats["receipts_unanswered"] == 0

    await eventually(again, within=15, what="the three receipts delivered again and answered")
    # none could be answered on the first session (the store held them until it was cut): the three
    # answered are the ones delivered again, stored by the SMSC's id alone (the store finds the
    # delivery by it)
    assert {r.partner_id for call in sink.calls for r in call} == {r.partner_id for r in results}


async def test_no_more_than_the_window_of_submit_sm_awaits_its_response(
    smpp: tuple[SmppAdapter, Receipts], sandbox: SandboxProcess
) -> None:
    adapter, _ = smpp
    await sandbox.faults("smpp", latency_s=0.3, count=-1)
    results = await adapter.send([_sms(f"w{i}", f"+7701000000{i}", "Leave now") for i in range(9)])
    assert {r.outcome for r in results} == {"accepted"}
    assert (await _stats(sandbox))["most_open_requests"] == 3


async def test_throttled_and_failed_submits_are_retried_a_bad_destination_is_not(
    smpp: tuple[SmppAdapter, Receipts], sandbox: SandboxProcess
) -> None:
    adapter, _ = smpp
    await sandbox.faults("smpp", status=429, count=1)
    assert (await adapter.send([_sms("t1", "+77011234567", "x")]))[0].outcome == "retry"
    await sandbox.faults("smpp", status=503, count=1)
    assert (await adapter.send([_sms("t2", "+77011234567", "x")]))[0].outcome == "retry"
    await sandbox.faults("smpp", status=400, count=1)
    (bad,) = await adapter.send([_sms("t3", "+77011234567", "x")])
    assert (bad.outcome, bad.reason) == ("rejected", "SMSC answered ESME_RINVDSTADR")


async def test_the_link_is_kept_alive_and_rebinds_after_the_smsc_drops_it(
    smpp: tuple[SmppAdapter, Receipts], sandbox: SandboxProcess
) -> None:
    adapter, _ = smpp
    assert (await adapter.send([_sms("a", "+77011234567", "first")]))[0].outcome == "accepted"

    async def kept_alive() -> bool:
        return int((await _stats(sandbox))["enquire_links"]) >= 2  # type: ignore[call-overload]

    await eventually(kept_alive, within=10, what="enquire_link every 0.2 s")
    async with aiohttp.ClientSession() as http, http.post(f"{sandbox.url}/control/smpp/drop") as resp:
        assert (await resp.json())["dropped"] == 1

    async def rebound() -> bool:
        return (await _stats(sandbox))["binds"] == 2

    await eventually(rebound, within=15, what="the ESME binds again")
    assert (await adapter.send([_sms("b", "+77011234567", "after reconnect")]))[0].outcome == "accepted"


async def test_an_smpp_broadcast_ends_delivered_by_deliver_sm(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    await load_recipients(gateway, tmp_path, 80, reach="phone", languages="kk|ru")
    record = signed(advisory(channels=["smpp"]))
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)

    await eventually(
        lambda: reached(gateway, record["id"], "delivered", 80, "smpp"),
        within=60,
        what="80 SMPP messages delivered",
    )
    stats = await _stats(sandbox)
    assert (stats["unique_recipients"], stats["duplicates"]) == (80, 0)
    assert stats["encodings"] == {"ucs2": 80}


async def test_smpp_receipts_are_applied_by_an_instance_without_the_receipts_role(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    """An SMSC writes each deliver_sm once, to the bind that sent the message: the instance holding
    the bind applies it, whatever its roles (here intake and dispatch, no receipt webhooks)."""
    settings = make_settings(tmp_path, kafka_bootstrap, sandbox, GATEWAY__GATEWAY__ROLES="[intake, dispatch]")
    async with running_gateway(settings, sandbox) as gw:
        await load_recipients(gw, tmp_path, 30, reach="phone", languages="kk|ru")
        record = signed(advisory(channels=["smpp"]))
        await publish(gw.bootstrap_servers, gw.settings.kafka.topic_advisories, record)
        await eventually(
            lambda: reached(gw, record["id"], "delivered", 30, "smpp"),
            within=60,
            what="30 SMPP messages delivered by receipts on this instance's bind",
        )
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{gw.public_url}/receipts/push", data=b"{}") as resp,
        ):
            assert resp.status == 404  # and no receipt webhook here: it is not this instance's role


class _Expired(AbstractHook):
    def __init__(self) -> None:
        self.expired: list[str] = []

    async def sending(self, smpp_message: SmppMessage, pdu: bytes, client_id: str) -> None:
        return None

    async def received(self, smpp_message: SmppMessage | None, pdu: bytes, client_id: str) -> None:
        return None

    async def send_error(self, smpp_message: SmppMessage, error: Exception, client_id: str) -> None:
        self.expired.append(str(getattr(smpp_message, "log_id", "")))


async def test_the_correlator_expires_what_outlived_its_lifetime_and_keeps_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Expiry reads from the oldest item and stops at the first young one (it once walked every item
    on every PDU): an unanswered submit_sm still expires (its sender is told, and retries), a receipt
    correlation still lives its 3 days, and one past them is forgotten."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    correlator, hook = _Correlator("esme"), _Expired()
    correlator.hook, correlator.client_id = hook, "smpp"

    def submit(n: int) -> SubmitSm:
        to = PhoneNumber("77011234567", TON.INTERNATIONAL, NPI.ISDN)
        return SubmitSm(short_message="x", source=to, destination=to, log_id=f"m{n}", sequence_num=n)

    for n, at in ((1, 1000.0), (2, 1001.0), (3, 1020.0)):
        clock[0] = at
        await correlator.put(submit(n))
        await correlator.put_delivery(f"smsc-{n}", submit(n))
    assert hook.expired == ["m1", "m2"]  # unanswered 15 s: expired when m3 went, in the order sent
    answer = SubmitSmResp(message_id="smsc-3", sequence_num=3)
    assert getattr(await correlator.get(answer), "log_id", None) == "m3"
    to = submit(1).destination
    receipt = DeliverSm(short_message="id:smsc-1 stat:DELIVRD", source=to, destination=to, esm_class=0b100)
    assert getattr(await correlator.get_delivery(receipt), "log_id", None) == "m1"  # 20 s: kept
    clock[0] = 1020.0 + 3 * 86400 + 1.0  # past every receipt correlation's 3 days
    await correlator.put(submit(4))
    assert (len(correlator._delivery_store), hook.expired) == (0, ["m1", "m2"])


async def test_a_throttled_answer_pauses_the_session_for_a_moment_not_for_minutes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [50.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    throttle = _Throttle(0.1, 0.3)
    assert await throttle.allow_request()
    pauses = []
    for _ in range(4):  # throttled answers in a row: 0.1, 0.2, then at most 0.3 s
        await throttle.throttled()
        assert not await throttle.allow_request()
        pauses.append(round(await throttle.throttle_delay(), 3))
    assert pauses == [0.1, 0.2, 0.3, 0.3]
    clock[0] += 0.3
    assert await throttle.allow_request()  # the pause is over by itself
    await throttle.throttled()
    await throttle.not_throttled()  # an answer that is not throttled ends the pausing at once
    assert (await throttle.allow_request(), await throttle.throttle_delay()) == (True, 0.0)
