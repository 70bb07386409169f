"""A sandbox mail relay: a real SMTP server (aiosmtpd) on the sandbox's event loop, that counts
what it accepted and sends delivery events — or bounces — to the gateway's webhook
(docs/partner-email-api.md). A recipient address containing ``bounce`` is accepted, then bounced."""

from __future__ import annotations

import asyncio
import re
from email import message_from_bytes
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.sandbox.partner import SandboxPartner


def smtp_answer(status: int) -> str:
    """A fault given as an HTTP partner's status (as the drills give them), as a relay says it:
    429 → 451 (try again later), 5xx → 421 (service not available: the relay is down); any
    other status → 550 (refused for good)."""
    if status == 429:
        return "451 4.7.0 injected fault: too many messages, try again later"
    if status >= 500:
        return "421 4.3.2 injected fault: service not available"
    return f"550 5.0.0 injected fault ({status})"


# "<local@domain>" and the rest of a MAIL or RCPT command: what a relay is sent nearly always
_ATOMS = r"[A-Za-z0-9_%+\-]+(?:\.[A-Za-z0-9_%+\-]+)*"  # dot-atoms of plain characters
_PLAIN_ARG = re.compile(rf"\s*<({_ATOMS}@{_ATOMS})>\s*(.*)", re.DOTALL)


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP with a quick reading of a plain ``<local@domain>`` address. Its own reading
    (the email package's header parser, and a ``Protocol`` class made on every call) was half of the
    sandbox relay's time at 20,000 recipients, and the relay bounded the e-mail bench. Anything else
    is read by aiosmtpd as before."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = _PLAIN_ARG.fullmatch(arg)
        if plain is None or (self.local_part_limit and plain[1].find("@") > self.local_part_limit):
            return super()._getaddr(arg)
        return plain[1], plain[2]


class EmailSink(SandboxPartner):
    channel = "email"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.smtp_port = 0
        self.messages = 0  # DATA taken (a message may have several recipients)
        self.multipart = 0
        self.resent = 0  # messages whose Message-ID was taken before
        self.pipelining = True  # announced in EHLO (false: a relay without it, as tests need)
        self._server: asyncio.base_events.Server | None = None

    async def start_smtp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _SinkSMTP(self, hostname="sandbox-relay", enable_SMTPUTF8=True), host, port
        )
        self.smtp_port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await super().stop()

    def stats(self, since: float | None = None) -> dict[str, Any]:
        return {
            **super().stats(since),
            "smtp_port": self.smtp_port,
            "messages": self.messages,
            "multipart": self.multipart,
            "resent_message_ids": self.resent,
        }

    def receipt(self, key: str, message_id: str, status: str) -> dict[str, Any]:
        # key: the Message-ID, or "<Message-ID>/<recipient>" for a message with several recipients
        shared_id, slash, recipient = key.partition(">/")
        if not slash:
            return {"message_id": key, "event": status}
        return {"message_id": shared_id + ">", "recipient": recipient, "event": status}

    def receipt_body(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return {"events": batch}

    # aiosmtpd handler hooks
    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """Announce PIPELINING (RFC 2920), as real relays do: aiosmtpd reads pipelined commands in
        order and answers each in turn, but does not say so."""
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.requests += 1
        fault = self.faults.take()
        if fault is not None:
            if fault.latency_s:
                await asyncio.sleep(fault.latency_s)
            if fault.hang:
                await asyncio.Event().wait()  # never answers; the client's timeout ends it
            if fault.reset and isinstance(server.transport, asyncio.Transport):
                server.transport.abort()  # the connection drops before the answer
                return "421 4.4.2 injected fault: connection dropped"
            if fault.status is not None:
                return smtp_answer(fault.status)
        raw = envelope.content if isinstance(envelope.content, bytes) else (envelope.content or "").encode()
        # compat32: headers as sent, not parsed into objects — 0.2 ms a message instead of 3.4 ms with
        # policy.default, which bounded the bench's e-mail floor; the relay only checks and counts
        msg = message_from_bytes(raw)
        message_id = str(msg.get("Message-ID", "")).strip()
        types = {part.get_content_type() for part in msg.walk()}
        if not message_id or not msg.get("Subject") or "text/plain" not in types:
            self.rejected += 1
            return "554 5.6.0 Message-ID, Subject and a text/plain part are required"
        if len(envelope.rcpt_tos) > 1 and not message_id.endswith(">"):
            self.rejected += 1
            return "554 5.6.0 a Message-ID in angle brackets is required"
        self.messages += 1
        if "text/html" in types:
            self.multipart += 1
        advisory = str(msg.get("X-Advisory", "?"))
        language = str(msg.get("Content-Language", "?"))
        for rcpt in envelope.rcpt_tos:
            key = message_id if len(envelope.rcpt_tos) == 1 else f"{message_id}/{rcpt}"
            if key in self.answers:
                # a relay delivers every DATA it takes: the same Message-ID again is a second e-mail
                # in the citizen's inbox, counted as a duplicate (it used to be hidden as a replay)
                self.resent += 1
                self.count(rcpt, advisory, language)
                continue
            self.accept(key, rcpt, advisory, language, status="bounced" if "bounce" in rcpt else None)
        return "250 2.0.0 OK queued"
