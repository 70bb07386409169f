"""E-mail over real SMTP: what the relay receives, how its answers are classified, and events back."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import sqlalchemy as sa
from aiosmtpd.smtp import SMTP, Envelope, Session
from aiosmtplib.email import flatten_message
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from channels.base import Message, Result, hmac_headers
from channels.email import EmailAdapter, EmailSettings, mime
from gateway.app import Gateway
from gateway.broker import free_port
from gateway.cli import publish
from gateway.directory import import_file
from gateway.dispatch import Dispatcher
from gateway.models import Advisory, Chunk, Status, now
from gateway.rendering import Renderer
from gateway.sandbox.process import SandboxProcess
from gateway.schema import deliveries
from gateway.settings import Settings, load_settings
from tests.conftest import advisory, eventually, running_gateway, self_signed, signed


class Inbox:
    """An aiosmtpd handler that keeps what it receives, and can answer with a chosen code; with
    ``pipelining`` it announces PIPELINING (aiosmtpd reads grouped commands but does not say so)."""

    def __init__(self, pipelining: bool = False) -> None:
        self.pipelining = pipelining
        self.messages: asyncio.Queue[EmailMessage] = asyncio.Queue()
        self.envelopes: list[list[str]] = []  # each message's envelope recipients, in order
        self.answer = "250 OK"
        self.rcpt_answers: dict[str, str] = {}  # an address -> the relay's answer to its RCPT

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]] if self.pipelining else responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        answer = self.rcpt_answers.get(address, "250 OK")
        if answer.startswith("250"):
            envelope.rcpt_tos.append(address)
        return answer

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        msg = message_from_bytes(envelope.content or b"", policy=policy.default)  # type: ignore[arg-type]
        assert isinstance(msg, EmailMessage)
        self.envelopes.append(list(envelope.rcpt_tos))
        await self.messages.put(msg)
        return self.answer


@pytest_asyncio.fixture(params=["pipelined", "a command at a time"])
async def inbox(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Inbox, int]]:
    """A relay announcing PIPELINING, and one that does not: the adapter must work with both."""
    handler = Inbox(pipelining=request.param == "pipelined")
    port = free_port()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True), "127.0.0.1", port
    )
    yield handler, port
    server.close()
    await server.wait_closed()


def _adapter(session: aiohttp.ClientSession, port: int) -> EmailAdapter:
    settings = EmailSettings(adapter="email", port=port, secret="s", timeout_s=2.0, pool_size=2)
    return EmailAdapter("email", settings, session)


def _rendered_kazakh() -> Message:
    renderer = Renderer(load_settings(environ={}).rendering.templates_path(), "en")
    adv = Advisory.model_validate(advisory())
    parts = renderer.render(adv, "kk", "email", ("subject", "text"), optional=("html",))
    return Message("d0e1", "aigerim@example.kz", parts, "kk", adv.id, 1, 0, now() + timedelta(hours=1))


async def test_the_relay_receives_multipart_text_and_html_in_kazakh_with_our_message_id(
    inbox: tuple[Inbox, int],
) -> None:
    handler, port = inbox
    async with aiohttp.ClientSession() as session:
        adapter = _adapter(session, port)
        (result,) = await adapter.send([_rendered_kazakh()])
        await adapter.close()
    assert (result.outcome, result.partner_id) == ("accepted", "<d0e1@gateway.mfa.example>")
    msg = await handler.messages.get()
    assert msg["Message-ID"] == "<d0e1@gateway.mfa.example>"
    assert "ашық" in str(msg["Subject"])
    assert msg["Content-Language"] == "kk"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None
    assert html is not None
    assert "Консулдық жедел желі" in text.get_content()
    assert '<html lang="kk">' in html.get_content()


async def test_5xx_is_rejected_4xx_and_a_dead_relay_are_retried(inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    async with aiohttp.ClientSession() as session:
        adapter = _adapter(session, port)
        handler.answer = "550 5.1.1 mailbox unavailable"
        assert (await adapter.send([_rendered_kazakh()]))[0].outcome == "rejected"
        handler.answer = "451 4.3.0 try later"
        assert (await adapter.send([_rendered_kazakh()]))[0].outcome == "retry"
        await adapter.close()
        dead = _adapter(session, free_port())
        (result,) = await dead.send([_rendered_kazakh()])
    assert result.outcome == "retry"
    assert "unreachable" in (result.reason or "")


def test_events_map_bounced_to_failed_and_ignore_what_is_not_final() -> None:
    adapter = EmailAdapter("email", EmailSettings(adapter="email", secret="s"), None)  # type: ignore[arg-type]
    events = [
        {"message_id": "<a1@gateway.mfa.example>", "event": "delivered"},
        {"message_id": "<b2@gateway.mfa.example>", "event": "bounced"},
        {"message_id": "<c3@gateway.mfa.example>", "event": "deferred"},
    ]
    body = json.dumps({"events": events}).encode()
    got = adapter.parse_receipts(body, hmac_headers("s", body))
    assert [(r.delivery_id, r.status) for r in got] == [("a1", Status.DELIVERED), ("b2", Status.FAILED)]


async def test_an_email_broadcast_ends_delivered_and_a_bounce_ends_failed(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    path = tmp_path / "mail.csv"
    rows = "".join(f"e{i:03d},ru,citizen{i}@example.kz,XA\n" for i in range(60))
    path.write_text(
        "id,languages,email,country\n" + rows + "e999,en,bounce-me@example.kz,XA\n", encoding="utf-8"
    )
    assert gateway.store is not None
    await import_file(gateway.store, path)
    record = signed(advisory(channels=["push", "sms-http", "email"]))
    await publish(gateway.bootstrap_servers, gateway.settings.kafka.topic_advisories, record)
    store = gateway.store

    async def settled() -> bool:
        return (await store.counts(record["id"])).get("email") == {"delivered": 60, "failed": 1}

    await eventually(settled, what="60 delivered and 1 bounced")
    stats = (await sandbox.stats())["channels"]["email"]
    per = stats["by_advisory"][f"{record['id']}@v1"]
    assert (per["accepted"], per["unique_recipients"], per["duplicates"]) == (61, 61, 0)
    assert per["languages"] == {"en": 1, "ru": 60}
    # recipients of one rendering share messages of up to 50: at least 2 in Russian, 1 in English
    assert 3 <= stats["messages"] < 61
    assert stats["multipart"] == stats["messages"]


def _self_signed(tmp_path: Path) -> ssl.SSLContext:
    key, cert = self_signed("127.0.0.1", ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "a command at a time"])
async def test_starttls_is_used_when_the_relay_requires_it(tmp_path: Path, pipelining: bool) -> None:
    """Pipelined, the connection is taken over after the upgrade: the envelope travels encrypted."""
    handler = Inbox(pipelining=pipelining)
    port = free_port()
    context = _self_signed(tmp_path)
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, tls_context=context, require_starttls=True), "127.0.0.1", port
    )
    try:
        async with aiohttp.ClientSession() as session:
            plain = EmailAdapter(
                "email", EmailSettings(adapter="email", port=port, secret="s", start_tls=False), session
            )
            (refused,) = await plain.send([_rendered_kazakh()])
            await plain.close()
            secured = EmailAdapter(
                "email",
                EmailSettings(adapter="email", port=port, secret="s", start_tls=True, validate_certs=False),
                session,
            )
            with capture_logs() as logs:
                (sent,) = await secured.send([_rendered_kazakh()])
            await secured.close()
        assert refused.outcome == "rejected"
        assert "530" in (refused.reason or ""), "the relay demands STARTTLS first"
        assert sent.outcome == "accepted"
        assert (await handler.messages.get())["Message-ID"] == "<d0e1@gateway.mfa.example>"
        connected = [e for e in logs if e["event"] == "email.relay_connected"]
        assert [(e["tls"], e["pipelining"]) for e in connected] == [(True, pipelining)]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_message_that_cannot_be_built_fails_alone_and_the_rest_go_once(
    inbox: tuple[Inbox, int],
) -> None:
    """A subject with a line break (or a non-ASCII address) once raised ValueError inside the
    adapter: the whole chunk was retried every 2 s and the good messages re-sent each time."""
    handler, port = inbox
    good = _rendered_kazakh()
    header_break = good._replace(delivery_id="d-bad", parts={**good.parts, "subject": "Leave\nnow"})
    bad_address = good._replace(delivery_id="d-addr", address="айгерим@мысал.kz")
    second = good._replace(delivery_id="d0e2", address="aigerim2@example.kz")
    reported: list[str] = []

    async def on_result(results: Sequence[Result]) -> None:
        reported.extend(r.delivery_id for r in results)

    async with aiohttp.ClientSession() as session:
        adapter = _adapter(session, port)
        try:
            results = await adapter.send([good, header_break, bad_address, second], on_result=on_result)
        finally:
            await adapter.close()
    outcome = {r.delivery_id: (r.outcome, (r.reason or "")[:25]) for r in results}
    assert outcome == {
        "d0e1": ("accepted", ""),
        "d0e2": ("accepted", ""),
        "d-bad": ("rejected", "cannot build the e-mail: "),
        "d-addr": ("rejected", "cannot build the e-mail: "),
    }
    assert sorted(reported) == ["d0e1", "d0e2"]  # recorded as the relay answered their message
    received = await handler.messages.get()  # the two good ones share one rendering: one message
    assert handler.messages.empty()
    assert handler.envelopes == [["aigerim@example.kz", "aigerim2@example.kz"]]
    assert received["To"] == "undisclosed-recipients:;"


async def test_recipients_of_one_rendering_share_a_message_and_each_keeps_their_own_answer(
    inbox: tuple[Inbox, int],
) -> None:
    """Four Kazakh and one Russian recipient: two messages. A recipient the relay refuses at RCPT
    is rejected (5xx) or retried (4xx) alone; the others are sent, each with a partner id that a
    relay's event naming the message and the address finds again."""
    handler, port = inbox
    kk = _rendered_kazakh()
    batch = [kk._replace(delivery_id=f"k{i}", address=f"kk{i}@example.kz") for i in range(4)]
    ru = kk._replace(
        delivery_id="r0",
        address="ru0@example.kz",
        language="ru",
        parts={"subject": "Выезд", "text": "Пограничные пункты открыты."},
    )
    handler.rcpt_answers = {"kk1@example.kz": "550 5.1.1 no such mailbox", "kk2@example.kz": "452 4.2.2 full"}
    async with aiohttp.ClientSession() as session:
        adapter = _adapter(session, port)
        try:
            results = await adapter.send([*batch, ru])
        finally:
            await adapter.close()
    by_id = {r.delivery_id: r for r in results}
    assert {i: r.outcome for i, r in by_id.items()} == {
        "k0": "accepted",
        "k1": "rejected",
        "k2": "retry",
        "k3": "accepted",
        "r0": "accepted",
    }
    assert sorted(handler.envelopes) == [["kk0@example.kz", "kk3@example.kz"], ["ru0@example.kz"]]
    messages = {str(m["Content-Language"]): m for m in [handler.messages.get_nowait() for _ in range(2)]}
    shared, alone = messages["kk"], messages["ru"]
    assert shared["To"] == "undisclosed-recipients:;", "no recipient sees another's address"
    assert (alone["To"], alone["Message-ID"]) == ("ru0@example.kz", adapter.message_id("r0"))
    assert by_id["r0"].partner_id == adapter.message_id("r0")
    events = [
        {"message_id": str(shared["Message-ID"]), "recipient": "kk3@example.kz", "event": "delivered"},
        {"message_id": str(shared["Message-ID"]), "recipient": "kk0@example.kz", "event": "bounced"},
        {"message_id": str(alone["Message-ID"]), "event": "delivered"},
    ]
    body = json.dumps({"events": events}).encode()
    got = adapter.parse_receipts(body, hmac_headers("s", body))
    assert [(r.partner_id, r.status) for r in got if not r.delivery_id] == [
        (by_id["k3"].partner_id, Status.DELIVERED),
        (by_id["k0"].partner_id, Status.FAILED),
    ]
    assert [(r.delivery_id, r.status) for r in got if r.delivery_id] == [("r0", Status.DELIVERED)]
    assert len({by_id["k0"].partner_id, by_id["k3"].partner_id}) == 2
    assert "kk0" not in str(by_id["k0"].partner_id), "the address is not copied into the store"


async def test_one_recipient_per_message_when_configured(inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    kk = _rendered_kazakh()
    batch = [kk._replace(delivery_id=f"k{i}", address=f"kk{i}@example.kz") for i in range(3)]
    settings = EmailSettings(adapter="email", port=port, secret="s", timeout_s=2.0, recipients_per_message=1)
    async with aiohttp.ClientSession() as session:
        adapter = EmailAdapter("email", settings, session)
        try:
            results = await adapter.send(batch)
        finally:
            await adapter.close()
    assert [r.partner_id for r in results] == [adapter.message_id(f"k{i}") for i in range(3)]
    assert sorted(handler.envelopes) == [[f"kk{i}@example.kz"] for i in range(3)]
    assert EmailAdapter.unrecorded_bound(settings) == settings.pool_size


async def test_messages_of_one_rendering_are_flattened_once_and_each_carries_its_own_message_id(
    inbox: tuple[Inbox, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shared messages of one rendering (one batch each): the same body, each with its own
    Message-ID, the one its recipients' partner ids name, and the time it was sent as its Date (the
    body was flattened once); a second rendering gets its own body."""
    handler, port = inbox
    clock = iter(f"Sun, 06 Dec 2026 08:0{minute}:00 GMT" for minute in range(10))
    monkeypatch.setattr("channels.email.formatdate", lambda usegmt: next(clock))
    kk = _rendered_kazakh()
    first = [kk._replace(delivery_id=f"a{i}", address=f"a{i}@example.kz") for i in range(2)]
    second = [kk._replace(delivery_id=f"b{i}", address=f"b{i}@example.kz") for i in range(2)]
    other = {**kk.parts, "subject": "Шекара жабық"}
    third = [
        m._replace(delivery_id=f"c{i}", address=f"c{i}@example.kz", parts=other) for i, m in enumerate(first)
    ]
    async with aiohttp.ClientSession() as session:
        adapter = _adapter(session, port)
        try:
            results = [r for b in (first, second, third) for r in await adapter.send(b)]
        finally:
            await adapter.close()
    received = [handler.messages.get_nowait() for _ in range(3)]
    ids = [str(m["Message-ID"]) for m in received]
    assert len(set(ids)) == 3
    assert all(str(r.partner_id).split("/")[0] in ids for r in results)
    assert {str(r.partner_id).split("/")[0] for r in results[:2]} == {ids[0]}
    bodies = [str(m.get_body(("plain",)).get_content()) for m in received]  # type: ignore[union-attr]
    assert bodies[0] == bodies[1] == bodies[2]
    assert [str(m["Subject"]) for m in received][1:] == [str(received[0]["Subject"]), "Шекара жабық"]
    sent_at = [parsedate_to_datetime(f"Sun, 06 Dec 2026 08:0{minute}:00 GMT") for minute in range(3)]
    assert [parsedate_to_datetime(str(m["Date"])) for m in received] == sent_at


async def _queued_emails(gw: Gateway, tmp_path: Path, local: str) -> tuple[dict[str, Any], list[str]]:
    """40 e-mail recipients and an advisory to them, planned and queued (for a gateway that does not
    dispatch); the advisory record and its delivery ids, sorted."""
    path = tmp_path / "mail.csv"
    rows = "".join(f"m{i:03d},ru,{local}{i}@example.kz,XA\n" for i in range(40))
    path.write_text("id,languages,email,country\n" + rows, encoding="utf-8")
    assert gw.store is not None
    store = gw.store
    await import_file(store, path)
    record = signed(advisory(channels=["email"]))
    await publish(gw.bootstrap_servers, gw.settings.kafka.topic_advisories, record)

    async def planned() -> bool:
        return (await store.counts(record["id"])).get("email") == {"queued": 40}

    await eventually(planned, what="40 e-mails planned and queued")
    async with store.engine.connect() as conn:
        q = sa.select(deliveries.c.id).where(deliveries.c.advisory_id == record["id"])
        return record, sorted(str(i) for i in (await conn.execute(q)).scalars())


async def test_the_same_chunk_twice_at_once_sends_each_email_once(
    settings: Settings, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    """A page planned again after a crash puts the same delivery ids in a second chunk; two workers
    once sent both (SMTP has no idempotency key): the e-mail crash drill counted 105 duplicates under
    load against a bound of 16. A delivery in one worker's hands is left to it."""
    intake_only = settings.model_copy(
        update={"gateway": settings.gateway.model_copy(update={"roles": ("intake",)})}
    )
    async with running_gateway(intake_only, sandbox) as gw:  # plans, and nobody dispatches
        record, ids = await _queued_emails(gw, tmp_path, "twice")
        assert gw.store is not None
        store = gw.store
        renderer = Renderer(settings.rendering.templates_path(), settings.rendering.default_language)
        dispatcher = Dispatcher(store, renderer, gw.adapters, settings.dispatch, {})
        chunk = Chunk(record["id"], 1, "email", tuple(ids))
        await asyncio.gather(dispatcher.handle_chunk(chunk), dispatcher.handle_chunk(chunk))
        per = (await sandbox.stats())["channels"]["email"]["by_advisory"][f"{record['id']}@v1"]
        assert (per["accepted"], per["unique_recipients"], per["duplicates"]) == (40, 40, 0)
        assert (await store.counts(record["id"]))["email"].get("queued") is None


async def test_two_instances_with_the_same_chunk_send_each_email_once_and_take_over_a_dead_claim(
    settings: Settings, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    """Two instances (two dispatchers, each with its own in-hand set) get the same chunk at once:
    each e-mail is claimed in the store by one of them and sent once. Deliveries a dead instance had
    claimed are sent once its claim has run out, not skipped."""
    intake_only = settings.model_copy(
        update={"gateway": settings.gateway.model_copy(update={"roles": ("intake",)})}
    )
    async with running_gateway(intake_only, sandbox) as gw:  # plans, and nobody dispatches
        record, ids = await _queued_emails(gw, tmp_path, "claim")
        assert gw.store is not None
        store = gw.store
        # ten of them were claimed by an instance that died before sending (its claim is over)
        assert len(await store.pending_work(ids[:10], claim="dead-instance", lease_s=-1.0)) == 10
        renderer = Renderer(settings.rendering.templates_path(), settings.rendering.default_language)
        one = Dispatcher(store, renderer, gw.adapters, settings.dispatch, {})
        two = Dispatcher(store, renderer, gw.adapters, settings.dispatch, {})
        chunk = Chunk(record["id"], 1, "email", tuple(ids))
        await asyncio.gather(one.handle_chunk(chunk), two.handle_chunk(chunk))
        per = (await sandbox.stats())["channels"]["email"]["by_advisory"][f"{record['id']}@v1"]
        assert (per["accepted"], per["unique_recipients"], per["duplicates"]) == (40, 40, 0)
        assert (await store.counts(record["id"]))["email"].get("queued") is None


def test_no_header_value_takes_a_line_break_and_a_long_kazakh_subject_comes_back_whole() -> None:
    """The MIME is built with the compat32 classes, which fold what they are given: a value with a
    line break would add headers of an advisory's choosing, so it is refused before building."""
    for bad in ("Leave\nnow", "Leave\rnow", "Leave\r\nBcc: everyone@example.kz"):
        with pytest.raises(ValueError, match="Subject: a line break"):
            mime({"Subject": bad}, "text")
    subject = "Арвенияда соғыс: шекара бекеттері ашық, консулдық жедел желіге хабарласыңыз — " * 3
    flat = flatten_message(mime({"Subject": subject, "Content-Language": "kk"}, "Мәтін.", "<p>Мәтін.</p>"))
    assert all(len(line) <= 998 for line in flat.splitlines())  # aiosmtplib sends them as CRLF
    msg = message_from_bytes(flat, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert str(msg["Subject"]) == subject
    assert msg["Content-Language"] == "kk"
    text, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text is not None
    assert html is not None
    assert (text.get_content().strip(), html.get_content().strip()) == ("Мәтін.", "<p>Мәтін.</p>")
