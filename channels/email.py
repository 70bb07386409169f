"""E-mail over SMTP (aiosmtplib): a pool of connections, STARTTLS / implicit TLS, each message's
envelope pipelined where the relay announces PIPELINING (channels/smtp_pipelining.py), multipart
text + HTML, the subject in the recipient's language. Recipients of one batch who get the same
rendered e-mail (advisory version, language, priority) share one SMTP transaction of up to
``recipients_per_message`` envelope recipients (``To: undisclosed-recipients:;``: no one sees
another's address); a message for one recipient alone carries ``Message-ID: <delivery id@domain>``.
Events come back on a signed webhook (docs/partner-email-api.md) naming the Message-ID and, for a
shared message, the recipient: ``delivered`` → delivered, ``bounced`` → failed.

Per recipient: a 5xx answer is permanent (rejected), a 4xx answer or a lost connection is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import Mapping, Sequence
from email.header import Header
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, formatdate
from pathlib import Path
from typing import Any, ClassVar, cast

import aiosmtplib
from aiosmtplib.email import flatten_message
from pydantic import Field, SecretStr

from channels.base import (
    ChannelSettings,
    Message,
    Receipt,
    Result,
    SignedChannelSettings,
    SignedHttpAdapter,
)
from channels.smtp_pipelining import Envelope, Relay, make_envelope
from gateway.errors import SchemaError
from gateway.lifecycle import key
from gateway.models import Status
from gateway.retry import Stopped
from gateway.settings import read_secret

EVENT_STATUS: dict[str, Status | None] = {
    "delivered": Status.DELIVERED,
    "bounced": Status.FAILED,
    "deferred": None,  # the relay keeps trying: not final
    "complained": None,  # a spam report after delivery: stays delivered
}


def mime(headers: Mapping[str, str], text: str, html: str | None = None) -> MIMEBase:
    """A text e-mail (``multipart/alternative`` with ``html``), UTF-8, built with the ``compat32``
    classes: 1.1 ms a message instead of 3.5 ms with ``EmailMessage`` (its header objects), nearly
    half of the gateway's CPU for e-mail. ``compat32`` does not refuse a header value with a line
    break as ``EmailMessage`` does, so it is refused here: an advisory's subject cannot add headers.
    A non-ASCII value is sent as an RFC 2047 encoded word."""
    body = MIMEText(text, "plain", "utf-8")
    msg: MIMEBase = body
    if html is not None:
        msg = MIMEMultipart("alternative")
        msg.attach(body)
        msg.attach(MIMEText(html, "html", "utf-8"))
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name}: a line break in a header value")
        # a Header object, encoded and folded by the generator (typeshed types the value as str only)
        msg[name] = value if value.isascii() else cast(str, Header(value, "utf-8", header_name=name))
    return msg


class EmailSettings(SignedChannelSettings):
    """``secret`` signs the event webhook; ``password`` (environment or file) logs in to the relay."""

    host: str = "127.0.0.1"
    port: int = Field(25, ge=1, le=65535)
    use_tls: bool = False  # implicit TLS (port 465)
    start_tls: bool | None = None  # None: upgrade when the relay offers STARTTLS
    validate_certs: bool = True
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    from_address: str = "alerts@mfa.example"
    from_name: str = "Ministry of Foreign Affairs"
    message_id_domain: str = "gateway.mfa.example"
    pool_size: int = Field(4, ge=1, le=64)
    # envelope recipients of one message (RFC 5321 4.5.3.1.8: a relay takes at least 100); 1 sends
    # every recipient a message of their own. A crash may re-send up to this many per connection.
    recipients_per_message: int = Field(50, ge=1, le=100)


UNDISCLOSED = "undisclosed-recipients:;"
# a shared message is flattened once per rendering, then its own Message-ID and the time it is sent
# are written over these (formatdate's text is always this long): building and flattening MIME took
# ~1 ms a message
_TEMPLATE_ID = "<shared@template.invalid>"
_TEMPLATE_DATE = "Thu, 01 Jan 1970 00:00:00 GMT"
TEMPLATES = 64  # renderings kept at most (advisory version × language × priority)


def recipient_partner_id(message_id: str, address: str) -> str:
    """A shared message's partner id for one of its recipients: the Message-ID and a digest of the
    address (the address itself is not copied into the deliveries table)."""
    digest = hashlib.sha256(address.strip().lower().encode()).hexdigest()[:16]
    return f"{message_id}/{digest}"


def _rendering(m: Message) -> tuple[Any, ...]:
    """What recipients who may share a message have in common: the rendering and the priority."""
    return (m.advisory_id, m.version, m.language, m.priority, tuple(sorted(m.parts.items())))


class EmailAdapter(SignedHttpAdapter):
    name = "email"
    kind = "email"
    parts = ("subject", "text")
    optional_parts = ("html",)
    header_parts = ("subject",)
    limits: ClassVar[Mapping[str, int]] = {"subject": 200}
    idempotent = False  # no idempotency key on the wire: dispatch claims before sending
    receipts_by_partner_id = True  # a shared message's events name its Message-ID and the recipient
    max_batch = 50
    settings_model = EmailSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.email_settings
        raw = s.password.get_secret_value() if s.password else None
        self._password = read_secret(f"channels.{self.channel}.password", raw, s.password_file)
        self._pool: asyncio.Queue[Relay] = asyncio.Queue()
        self._templates: dict[tuple[Any, ...], bytes] = {}
        for _ in range(s.pool_size):
            self._pool.put_nowait(self._client())

    @property
    def email_settings(self) -> EmailSettings:
        return cast(EmailSettings, self.settings)

    def _client(self) -> Relay:
        s = self.email_settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.use_tls,
            start_tls=s.start_tls,
            validate_certs=s.validate_certs,
            timeout=s.timeout_s,
        )
        return Relay(smtp, s.username, self._password, s.timeout_s)

    @classmethod
    def unrecorded_bound(cls, settings: ChannelSettings) -> int:
        """One message per pooled connection, each for up to ``recipients_per_message``: its results
        are recorded before its connection takes the next message (``Adapter.report``)."""
        s = cast(EmailSettings, settings)
        return s.pool_size * s.recipients_per_message

    def message_id(self, delivery_id: str) -> str:
        return f"<{delivery_id}@{self.email_settings.message_id_domain}>"

    def unbuildable(self, m: Message) -> str | None:
        """Also a non-ASCII address (SMTPUTF8 is not sent): refused alone, before recipients share
        a message."""
        if not m.address.isascii():
            return "cannot build the e-mail: the address is not ASCII (SMTPUTF8 addresses are not sent)"
        return super().unbuildable(m)

    def shared_message_id(self, first: Message) -> str:
        """A message for several recipients: named after its first delivery, with a random tag (a
        retried recipient travels in another message, which must not reuse the Message-ID)."""
        return f"<{first.delivery_id[:20]}.{secrets.token_hex(4)}@{self.email_settings.message_id_domain}>"

    def build(
        self, m: Message, to: str | None = None, message_id: str | None = None, date: str | None = None
    ) -> MIMEBase:
        """The e-mail for ``m``; ``to``, ``message_id`` and ``date`` for a message shared with others."""
        s = self.email_settings  # a non-ASCII address never gets here: ``unbuildable`` refused it
        headers = {
            "From": formataddr((s.from_name, s.from_address), charset="utf-8"),
            "To": to or m.address,
            "Subject": m.parts["subject"],
            "Date": date or formatdate(usegmt=True),
            "Message-ID": message_id or self.message_id(m.delivery_id),
            "X-Advisory": key(m.advisory_id, m.version),
            "Auto-Submitted": "auto-generated",
        }
        if m.priority == 0:
            headers["Importance"] = "high"
        headers["Content-Language"] = m.language
        return mime(headers, m.parts["text"], m.parts.get("html"))

    def _shared(self, first: Message, message_id: str) -> bytes:
        """The shared message of ``first``'s rendering with ``message_id`` and the time now: flattened
        once per rendering with placeholders (worker threads may build one twice, and keep either)."""
        rendering = _rendering(first)
        made = self._templates.get(rendering)
        if made is None:
            if len(self._templates) >= TEMPLATES:
                self._templates.clear()
            made = flatten_message(self.build(first, UNDISCLOSED, _TEMPLATE_ID, _TEMPLATE_DATE))
            self._templates[rendering] = made
        date = b"\nDate: " + formatdate(usegmt=True).encode()
        made = made.replace(b"\nDate: " + _TEMPLATE_DATE.encode(), date, 1)
        return made.replace(_TEMPLATE_ID.encode(), message_id.encode(), 1)

    def envelopes(self, batch: Sequence[Message]) -> list[list[Message]]:
        """The batch as messages to send: recipients of the same rendering (the renderer's one
        ``parts`` for an advisory version, language and channel; equal parts if rendered apart) and
        priority together, up to ``recipients_per_message`` each, in the batch's order."""
        size = self.email_settings.recipients_per_message
        groups: dict[tuple[Any, ...], list[list[Message]]] = {}
        order: list[list[Message]] = []
        for m in batch:
            runs = groups.setdefault(_rendering(m), [])
            # one address once per message: its receipt names the message and the address
            if not runs or len(runs[-1]) >= size or any(o.address == m.address for o in runs[-1]):
                runs.append([])
                order.append(runs[-1])
            runs[-1].append(m)
        return order

    async def _send(self, batch: Sequence[Message]) -> list[Result]:
        # the messages' MIME built and flattened in a worker thread: the event loop goes on meanwhile
        envelopes = self.envelopes(batch)
        flats = await asyncio.to_thread(lambda: [self._flat(e) for e in envelopes])
        sent = await asyncio.gather(*(self._send_one(e, f) for e, f in zip(envelopes, flats, strict=True)))
        return [r for results in sent for r in results]

    def _flat(self, envelope: Sequence[Message]) -> tuple[str, Envelope] | list[Result]:
        """The message built and flattened (headers folded and checked) and its envelope made
        before a connection is taken, with its Message-ID; or why it cannot be, for each of its
        recipients."""
        first = envelope[0]
        try:
            if len(envelope) == 1:
                message_id = self.message_id(first.delivery_id)
                raw = flatten_message(self.build(first))
            else:
                message_id = self.shared_message_id(first)
                raw = self._shared(first, message_id)
            made = make_envelope(self.email_settings.from_address, [m.address for m in envelope], raw)
        except Exception as e:  # a header with a line break, a non-ASCII address: this message only
            reason = f"cannot build the e-mail: {type(e).__name__}: {e}"[:300]
            return [Result(m.delivery_id, "rejected", reason=reason) for m in envelope]
        return message_id, made

    async def _send_one(
        self, envelope: Sequence[Message], flat: tuple[str, Envelope] | list[Result]
    ) -> list[Result]:
        if isinstance(flat, list):
            return flat
        message_id, made = flat
        unsendable = [
            Result(m.delivery_id, "rejected", reason=made.unsendable[m.address])
            for m in envelope
            if m.address in made.unsendable
        ]
        envelope = [m for m in envelope if m.address not in made.unsendable]
        if not envelope:
            return unsendable
        client = await self._pool.get()
        try:
            refused = await client.send(made)
            shared = len(envelope) + len(unsendable)
            results = [self._taken(m, message_id, shared, refused.get(m.address)) for m in envelope]
            # recorded before this connection takes the next message: a crash re-sends at most one
            # message per connection (the relay's 250 not yet recorded)
            await self.report([r for r in results if r.outcome == "accepted"])
            return results + unsendable
        except aiosmtplib.SMTPRecipientsRefused as e:  # every recipient refused: nothing was sent
            by_address = {r.recipient: r for r in e.recipients}
            return [self._refused(m, by_address.get(m.address)) for m in envelope] + unsendable
        except aiosmtplib.SMTPResponseException as e:
            reason = f"relay answered {e.code} {e.message}"
            return [
                Result(m.delivery_id, "rejected" if e.code >= 500 else "retry", reason=reason)
                for m in envelope
            ] + unsendable
        except Stopped:
            raise
        except Exception as e:  # unreachable, reset, timed out — or the client failed: a new connection
            with contextlib.suppress(Exception):
                client.close()
            client = self._client()
            reason = f"relay unreachable: {type(e).__name__}: {e}"[:300]
            return [Result(m.delivery_id, "retry", reason=reason) for m in envelope] + unsendable
        finally:
            self._pool.put_nowait(client)

    def _taken(self, m: Message, message_id: str, shared: int, refused: Any) -> Result:
        """One recipient's result once the relay took the message: accepted unless refused at RCPT."""
        if refused is not None:
            return self._refused(m, refused)
        partner_id = message_id if shared == 1 else recipient_partner_id(message_id, m.address)
        return Result(m.delivery_id, "accepted", partner_id=partner_id)

    @staticmethod
    def _refused(m: Message, refused: Any) -> Result:
        code = int(refused.code) if refused is not None else 550
        reason = f"relay refused the recipient: {code} {refused.message if refused else ''}".strip()
        return Result(m.delivery_id, "rejected" if code >= 500 else "retry", reason=reason)

    def parse_receipts(self, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        receipts = []
        for event in self.verified_json(body, headers, "events"):
            try:
                kind = str(event["event"])
                message_id = str(event["message_id"])
                recipient = event.get("recipient")
            except (KeyError, TypeError, AttributeError) as e:
                raise SchemaError(f"events: malformed event: {e}") from e
            if kind not in EVENT_STATUS:
                raise SchemaError(f"events: unknown event {kind!r}")
            status = EVENT_STATUS[kind]
            if status is None:
                continue
            if recipient is None:  # a message of its own: the Message-ID names the delivery
                receipts.append(Receipt(message_id.strip("<>").split("@", 1)[0], status, message_id))
            else:  # a shared message: matched by the partner id recorded for that recipient
                receipts.append(Receipt("", status, recipient_partner_id(message_id, str(recipient))))
        return receipts

    async def close(self) -> None:
        while not self._pool.empty():
            client = self._pool.get_nowait()
            with contextlib.suppress(Exception):
                await client.quit()
