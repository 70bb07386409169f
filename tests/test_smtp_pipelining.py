"""The e-mail adapter's relay connection (channels/smtp_pipelining.py): a relay that announces
PIPELINING gets each envelope in one group, and every reply is matched to its command; an address
that is not one plain mailbox is never sent; a lost or silent relay ends the transaction with an
error the adapter retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiosmtplib
import pytest
import pytest_asyncio

from channels.smtp_pipelining import Relay, make_envelope
from gateway.sandbox.email import EmailSink

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MESSAGE = b"Subject: Border crossings\r\n\r\nNorth Gate is open.\r\n.hidden line starts with a dot\r\n"


class Peer:
    """A relay played from a script, over a real socket: it greets, answers EHLO announcing
    PIPELINING, then runs ``script``; ``seen`` is every byte the client sent after EHLO."""

    def __init__(self) -> None:
        self.script: Script | None = None
        self.seen = bytearray()
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer ESMTP\r\n")
        await reader.readuntil(b"\r\n")  # EHLO
        writer.write(b"250-peer\r\n250-PIPELINING\r\n250 SIZE 10000000\r\n")
        assert self.script is not None
        try:
            await self.script(reader, writer)
        finally:
            writer.close()

    async def until(self, reader: asyncio.StreamReader, end: bytes) -> bytes:
        got = await reader.readuntil(end)
        self.seen.extend(got)
        return got


@pytest_asyncio.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    server = await asyncio.start_server(p.serve, "127.0.0.1", 0)
    p.port = server.sockets[0].getsockname()[1]
    yield p
    server.close()
    await server.wait_closed()


def _relay(port: int, timeout_s: float = 5.0) -> Relay:
    return Relay(aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False), None, None, timeout_s)


async def test_the_envelope_goes_in_one_group_and_each_reply_is_matched_to_its_recipient(peer: Peer) -> None:
    """The peer answers nothing until DATA has arrived: a client waiting for MAIL's reply would
    never get one. One recipient refused (550), one deferred (452); the message is dot-stuffed."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        group = await peer.until(reader, b"DATA\r\n")
        writer.write(
            b"250 sender ok\r\n250 ok\r\n550 5.1.1 no such mailbox\r\n452 4.2.2 full\r\n354 go on\r\n"
        )
        await peer.until(reader, b"\r\n.\r\n")
        writer.write(b"250 2.0.0 queued\r\n")
        assert group.count(b"\r\n") == 5
        await peer.until(reader, b"QUIT\r\n")
        writer.write(b"221 bye\r\n")

    peer.script = script
    relay = _relay(peer.port)
    envelope = make_envelope(
        "alerts@mfa.example", ["a@example.kz", "gone@example.kz", "full@example.kz"], MESSAGE
    )
    refused = await relay.send(envelope)
    assert relay.pipelining
    assert {a: r.code for a, r in refused.items()} == {"gone@example.kz": 550, "full@example.kz": 452}
    await relay.quit()
    seen = bytes(peer.seen)
    assert seen.startswith(
        b"MAIL FROM:<alerts@mfa.example> SIZE=%d\r\nRCPT TO:<a@example.kz>\r\n"
        b"RCPT TO:<gone@example.kz>\r\nRCPT TO:<full@example.kz>\r\nDATA\r\n" % (len(envelope.data) - 3)
    )
    assert b"\r\n..hidden line starts with a dot\r\n.\r\n" in seen
    assert seen.endswith(b"QUIT\r\n")


async def test_every_recipient_refused_sends_no_message_even_when_the_relay_takes_data(peer: Peer) -> None:
    """RFC 2920 3.1: a relay that says 354 to DATA after refusing every RCPT gets the empty message
    (a lone dot), never the advisory; the transaction is reset and each refusal is reported."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n550 5.1.1 no\r\n550 5.1.1 no\r\n354 go on\r\n")
        await peer.until(reader, b".\r\n")
        writer.write(b"554 5.5.1 no valid recipients\r\n")
        await peer.until(reader, b"RSET\r\n")
        writer.write(b"250 reset\r\n")
        await reader.read()

    peer.script = script
    relay = _relay(peer.port)
    envelope = make_envelope("alerts@mfa.example", ["x@example.kz", "y@example.kz"], MESSAGE)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await relay.send(envelope)
    assert sorted((r.recipient, r.code) for r in refused.value.recipients) == [
        ("x@example.kz", 550),
        ("y@example.kz", 550),
    ]
    relay.close()
    assert b"North Gate" not in peer.seen
    assert bytes(peer.seen).endswith(b"DATA\r\n.\r\nRSET\r\n")


async def test_a_relay_lost_in_the_middle_or_silent_ends_the_transaction_with_an_error(peer: Peer) -> None:
    """Each is an error the adapter retries; a connection lost is made again on its next use."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n")  # then the connection drops

    async def fine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n250 ok\r\n354 go on\r\n")
        await peer.until(reader, b"\r\n.\r\n")
        writer.write(b"250 queued\r\n")
        await reader.read()

    peer.script = hang_up
    relay = _relay(peer.port)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await relay.send(make_envelope("alerts@mfa.example", ["a@example.kz"], MESSAGE))
    assert not relay.connected
    peer.script = fine  # the same connection object connects again for the next message
    assert await relay.send(make_envelope("alerts@mfa.example", ["a@example.kz"], MESSAGE)) == {}
    relay.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.until(reader, b"DATA\r\n")
        await reader.read()  # never answers

    peer.script = silent
    relay = _relay(peer.port, timeout_s=0.3)
    with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
        await relay.send(make_envelope("alerts@mfa.example", ["a@example.kz"], MESSAGE))
    assert not relay.connected


async def test_a_reply_no_command_asked_for_ends_the_connection_before_the_next_message(peer: Peer) -> None:
    """A relay's 421 between two messages would be read as the next MAIL's reply and shift every
    reply after it: the next message goes over a new connection instead."""
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await peer.until(reader, b"DATA\r\n")
        writer.write(b"250 ok\r\n250 ok\r\n354 go on\r\n")
        await peer.until(reader, b"\r\n.\r\n")
        # the first time, a 421 in the same write as the message's reply; the connection stays open
        writer.write(b"250 queued\r\n" + (b"421 4.3.2 shutting down\r\n" if connections == 1 else b""))
        await reader.read()

    peer.script = script
    relay = _relay(peer.port)
    envelope = make_envelope("alerts@mfa.example", ["a@example.kz"], MESSAGE)
    assert await relay.send(envelope) == {}
    assert not relay.connected
    assert await relay.send(envelope) == {}
    assert connections == 2
    relay.close()


def test_an_address_that_is_not_one_plain_mailbox_is_set_aside_without_being_named() -> None:
    """``parseaddr`` would read ``a,b@example.kz`` and ``a>b@example.kz`` as ``a``: never sent."""
    odd = [
        "a,b@example.kz",
        "a>b@example.kz",
        "x(comment)@example.kz",
        "n\r\nRSET@example.kz",
        "ä@example.kz",
    ]
    envelope = make_envelope("alerts@mfa.example", ["ok.name+tag@example.kz", *odd, '"q r"@example.kz'], b"x")
    assert envelope.recipients == ["ok.name+tag@example.kz", '"q r"@example.kz']
    assert envelope.rcpt_lines == b'RCPT TO:<ok.name+tag@example.kz>\r\nRCPT TO:<"q r"@example.kz>\r\n'
    assert sorted(envelope.unsendable) == sorted(odd)
    assert not any("example" in reason for reason in envelope.unsendable.values())


async def test_the_sandbox_relay_announces_pipelining_and_takes_a_grouped_envelope() -> None:
    """The bench and the drills measure the pipelined path: aiosmtpd, told to announce it."""
    sink = EmailSink("s", None)
    await sink.start_smtp("127.0.0.1", 0)
    relay = _relay(sink.smtp_port)
    raw = b"Message-ID: <m1@gateway.example>\r\nContent-Type: text/plain\r\n" + MESSAGE
    try:
        refused = await relay.send(make_envelope("alerts@mfa.example", ["a@example.kz", "b@example.kz"], raw))
        assert relay.pipelining
        assert refused == {}
        assert sink.messages == 1
        assert (sink.stats()["accepted"], sink.stats()["unique_recipients"]) == (2, 2)
    finally:
        await relay.quit()
        await sink.stop()
