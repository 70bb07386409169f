"""One pooled connection to an SMTP relay for the e-mail adapter (channels/email.py), not an adapter
of its own: aiosmtplib connects, upgrades (STARTTLS or implicit TLS) and logs in; a relay that
announces PIPELINING (RFC 2920, as Postfix, Exim and the hosted relays do) then gets each message's
envelope — MAIL, every RCPT and DATA — in one write, and its replies are read in order. aiosmtplib
waits for each reply before the next command and has no pipelining: a shared message of 50
recipients cost 52 round trips, each a write on both sides, and bounded the e-mail channel
(docs/performance.md). A relay that does not announce it gets aiosmtplib's ``sendmail`` as before.

Either way a transaction answers as ``sendmail`` does: the recipients refused (a dict by address),
``SMTPRecipientsRefused`` if every one was, ``SMTPResponseException`` (and its subclasses) for a
refused sender or message, ``SMTPServerDisconnected`` or a timeout for a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import MAX_LINE_LENGTH, PERIOD_REGEX, normalize_message_line_endings

from gateway.logging import get_logger

log = get_logger(__name__)

COMMAND_INJECTION = frozenset(chr(c) for c in (*range(0x20), 0x7F))
# an address that needs no parsing (aiosmtplib's quote_address parses every one: ~20 µs)
_PLAIN = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+")


class Envelope(NamedTuple):
    """A message ready for the wire, made before a connection is taken (off the event loop): the
    recipients' quoted ``RCPT`` lines (an address that cannot be sent is in ``unsendable`` with why),
    and the content dot-stuffed and ended with the lone dot."""

    sender: str
    recipients: list[str]  # the addresses sendable, in order
    rcpt_lines: bytes
    unsendable: dict[str, str]
    raw: bytes  # the message as aiosmtplib's sendmail takes it
    data: bytes  # the message as sent after DATA's 354: line endings CRLF, dot-stuffed, "." last


def make_envelope(sender: str, addresses: Sequence[str], raw: bytes) -> Envelope:
    """The envelope of ``raw`` from ``sender`` to ``addresses``. An address that is not one plain
    mailbox is set aside with why (the reason names no address): aiosmtplib would refuse a control
    character, a space, a bracket or a quote, and would send ``a,b@example.kz`` or
    ``a>b@example.kz`` to ``<a>`` — what ``email.utils.parseaddr`` reads out of it."""
    recipients: list[str] = []
    lines: list[bytes] = []
    unsendable: dict[str, str] = {}
    for address in addresses:
        if _PLAIN.fullmatch(address) is None:
            try:
                quoted = quote_address(address)
            except ValueError:
                quoted = ""
            if quoted != f"<{address}>" or not address.isascii() or COMMAND_INJECTION.intersection(address):
                unsendable[address] = "the address is not one plain mailbox: it cannot be sent over SMTP"
                continue
        lines.append(b"RCPT TO:<" + address.encode("ascii") + b">\r\n")
        recipients.append(address)
    data = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(raw)) + b".\r\n"
    return Envelope(sender, recipients, b"".join(lines), unsendable, raw, data)


class _Replies(asyncio.Protocol):
    """A connection's replies, parsed in the order they come, for commands written in a group."""

    def __init__(self, transport: asyncio.Transport, timeout_s: float) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self._buffer = bytearray()
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.lost: Exception | None = None

    @property
    def open(self) -> bool:
        """Connected, and nothing said that no command asked for (a relay's 421 before it hangs up:
        read as the next command's reply, it would shift every reply after it by one)."""
        return self.lost is None and not self.transport.is_closing() and not self._replies

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        code, text, start = -1, [], 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            line = bytes(self._buffer[start : end + 1])
            start = end + 1
            try:
                code = int(line[:3])
            except ValueError:
                self._lose(aiosmtplib.SMTPResponseException(-1, f"malformed reply: {line[:80]!r}"))
                return
            text.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":  # the reply's last line
                self._replies.append(aiosmtplib.SMTPResponse(code, "\n".join(text)))
                del self._buffer[:start]
                code, text, start = -1, [], 0
        if len(self._buffer) > 4 * MAX_LINE_LENGTH:
            self._lose(aiosmtplib.SMTPResponseException(-1, "reply too long"))
            return
        self._wake()

    def eof_received(self) -> bool:
        self._lose(aiosmtplib.SMTPServerDisconnected("the relay closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(aiosmtplib.SMTPServerDisconnected(f"connection lost: {exc}" if exc else "connection lost"))

    def _lose(self, exc: Exception) -> None:
        if self.lost is None:
            self.lost = exc
        self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def write(self, data: bytes) -> None:
        if self.lost is not None or self.transport.is_closing():
            raise self.lost or aiosmtplib.SMTPServerDisconnected("connection lost")
        self.transport.write(data)

    async def read(self, n: int) -> list[aiosmtplib.SMTPResponse]:
        """The next ``n`` replies; ``SMTPReadTimeoutError`` after ``timeout_s`` without them."""
        try:
            async with asyncio.timeout(self.timeout_s):
                while len(self._replies) < n:
                    if self.lost is not None:
                        raise self.lost
                    self._waiter = asyncio.get_running_loop().create_future()
                    await self._waiter
        except TimeoutError as e:
            self._lose(aiosmtplib.SMTPReadTimeoutError("timed out waiting for the relay's reply"))
            raise aiosmtplib.SMTPReadTimeoutError("timed out waiting for the relay's reply") from e
        return [self._replies.popleft() for _ in range(n)]


class Relay:
    """One connection to the relay, connected on first use (and again after it was lost)."""

    def __init__(
        self, smtp: aiosmtplib.SMTP, username: str | None, password: str | None, timeout_s: float
    ) -> None:
        self.smtp = smtp
        self.timeout_s = timeout_s
        self._login = (username, password) if username and password else None
        self._replies: _Replies | None = None

    @property
    def connected(self) -> bool:
        return self._replies.open if self._replies is not None else self.smtp.is_connected

    @property
    def pipelining(self) -> bool:
        return self._replies is not None

    async def connect(self) -> None:
        await self.smtp.connect()
        if self._login is not None:
            await self.smtp.login(*self._login)
        if self.smtp.last_ehlo_response is None:  # not said yet (no STARTTLS asked nor login)
            with contextlib.suppress(aiosmtplib.SMTPHeloError):  # a relay of HELO only: no extensions
                await self.smtp.ehlo()
        transport = self.smtp.transport
        if self.smtp.supports_extension("pipelining") and isinstance(transport, asyncio.Transport):
            # aiosmtplib's reader parses one reply per command it wrote: ours reads from here on
            self._replies = _Replies(transport, self.timeout_s)
            transport.set_protocol(self._replies)
        # whether the relay pipelines is worth ~1.5x of e-mail's rate: the operator can see which it is
        log.info(
            "email.relay_connected",
            relay=f"{self.smtp.hostname}:{self.smtp.port}",
            tls=transport is not None and transport.get_extra_info("sslcontext") is not None,
            pipelining=self.pipelining,
        )

    async def send(self, e: Envelope) -> dict[str, aiosmtplib.SMTPResponse]:
        """One transaction (module docstring): the recipients refused, by address."""
        if not self.connected:
            self.close()  # aiosmtplib holds its connect lock until closed, and never saw ours drop
            await self.connect()
        if self._replies is None:
            refused, _ = await self.smtp.sendmail(e.sender, e.recipients, e.raw)
            return refused
        replies = self._replies
        mail = b"MAIL FROM:" + quote_address(e.sender).encode("ascii")
        if self.smtp.supports_extension("size"):
            mail += b" SIZE=%d" % (len(e.data) - 3)  # RFC 1870: the octets sent, without the ending dot
        replies.write(mail + b"\r\n" + e.rcpt_lines + b"DATA\r\n")
        answers = await replies.read(len(e.recipients) + 2)
        sender, data = answers[0], answers[-1]
        refused = {a: r for a, r in zip(e.recipients, answers[1:-1], strict=True) if r.code not in (250, 251)}
        if data.code == 354 and (sender.code != 250 or len(refused) == len(e.recipients)):
            # RFC 2920 3.1: DATA taken with no valid recipient: the client sends the empty message
            replies.write(b".\r\n")
            await replies.read(1)
        try:
            if sender.code != 250:
                raise aiosmtplib.SMTPSenderRefused(sender.code, sender.message, e.sender)
            if len(refused) == len(e.recipients):
                raise aiosmtplib.SMTPRecipientsRefused(
                    [aiosmtplib.SMTPRecipientRefused(r.code, r.message, a) for a, r in refused.items()]
                )
            if data.code != 354:
                raise aiosmtplib.SMTPDataError(data.code, data.message)
        except aiosmtplib.SMTPException:
            await self._reset()
            raise
        replies.write(e.data)
        (done,) = await replies.read(1)
        if done.code != 250:
            raise aiosmtplib.SMTPDataError(done.code, done.message)
        return refused

    async def _reset(self) -> None:
        """RSET after a refused transaction, as aiosmtplib's sendmail does; its failure is not the error."""
        if self._replies is not None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                self._replies.write(b"RSET\r\n")
                await self._replies.read(1)

    def close(self) -> None:
        if self._replies is not None:
            self._replies.transport.close()
            self._replies = None
        self.smtp.close()

    async def quit(self) -> None:
        if self._replies is not None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                self._replies.write(b"QUIT\r\n")
                await self._replies.read(1)
            self.close()
        elif self.smtp.is_connected:
            await self.smtp.quit()
