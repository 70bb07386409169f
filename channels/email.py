"""E-mail over SMTP (aiosmtplib): a pool of connections, STARTTLS / implicit TLS, multipart
text + HTML, the subject in the recipient's language, and ``Message-ID: <delivery id@domain>`` so
that bounces and delivery events find their delivery. Events come back on a signed webhook
(docs/partner-email-api.md): ``delivered`` → delivered, ``bounced`` → failed.

Per message: a 5xx answer is permanent (rejected), a 4xx answer or a lost connection is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class EmailAdapter(SignedHttpAdapter):
    name = "email"
    kind = "email"
    parts = ("subject", "text")
    optional_parts = ("html",)
    header_parts = ("subject",)
    limits: ClassVar[Mapping[str, int]] = {"subject": 200}
    idempotent = False  # no idempotency key on the wire: dispatch claims before sending
    max_batch = 50
    settings_model = EmailSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.email_settings
        raw = s.password.get_secret_value() if s.password else None
        self._password = read_secret(f"channels.{self.channel}.password", raw, s.password_file)
        self._pool: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        for _ in range(s.pool_size):
            self._pool.put_nowait(self._client())

    @property
    def email_settings(self) -> EmailSettings:
        return cast(EmailSettings, self.settings)

    def _client(self) -> aiosmtplib.SMTP:
        s = self.email_settings
        return aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.use_tls,
            start_tls=s.start_tls,
            validate_certs=s.validate_certs,
            timeout=s.timeout_s,
        )

    @classmethod
    def unrecorded_bound(cls, settings: ChannelSettings) -> int:
        """One message per pooled connection: each result is recorded before its connection takes
        the next message (``Adapter.report``)."""
        return cast(EmailSettings, settings).pool_size

    def message_id(self, delivery_id: str) -> str:
        return f"<{delivery_id}@{self.email_settings.message_id_domain}>"

    def build(self, m: Message) -> MIMEBase:
        s = self.email_settings
        if not m.address.isascii():
            raise ValueError("address: not ASCII; internationalised addresses (SMTPUTF8) are not sent")
        headers = {
            "From": formataddr((s.from_name, s.from_address), charset="utf-8"),
            "To": m.address,
            "Subject": m.parts["subject"],
            "Date": formatdate(usegmt=True),
            "Message-ID": self.message_id(m.delivery_id),
            "X-Advisory": key(m.advisory_id, m.version),
            "Auto-Submitted": "auto-generated",
        }
        if m.priority == 0:
            headers["Importance"] = "high"
        headers["Content-Language"] = m.language
        return mime(headers, m.parts["text"], m.parts.get("html"))

    async def _send(self, batch: Sequence[Message]) -> list[Result]:
        # the batch's MIME built and flattened in a worker thread: the event loop goes on meanwhile
        flats = await asyncio.to_thread(lambda: [self._flat(m) for m in batch])
        return list(
            await asyncio.gather(*(self._send_one(m, flat) for m, flat in zip(batch, flats, strict=True)))
        )

    def _flat(self, m: Message) -> bytes | Result:
        """The message built and flattened (headers folded and checked) before a connection is
        taken, or why it cannot be."""
        try:
            return flatten_message(self.build(m))
        except Exception as e:  # a header with a line break, a non-ASCII address: this message only
            reason = f"cannot build the e-mail: {type(e).__name__}: {e}"[:300]
            return Result(m.delivery_id, "rejected", reason=reason)

    async def _send_one(self, m: Message, flat: bytes | Result) -> Result:
        if isinstance(flat, Result):
            return flat
        client = await self._pool.get()
        try:
            if not client.is_connected:
                await client.connect()
                if self.email_settings.username and self._password:
                    await client.login(self.email_settings.username, self._password)
            await client.sendmail(self.email_settings.from_address, [m.address], flat)
            accepted = Result(m.delivery_id, "accepted", partner_id=self.message_id(m.delivery_id))
            # recorded before this connection takes the next message: a crash re-sends at most one
            # message per connection (the relay's 250 not yet recorded)
            await self.report(accepted)
            return accepted
        except aiosmtplib.SMTPRecipientsRefused as e:
            refused = e.recipients[0] if e.recipients else None
            code = refused.code if refused else 550
            reason = f"relay refused the recipient: {code} {refused.message if refused else ''}".strip()
            return Result(m.delivery_id, "rejected" if code >= 500 else "retry", reason=reason)
        except aiosmtplib.SMTPResponseException as e:
            return Result(
                m.delivery_id,
                "rejected" if e.code >= 500 else "retry",
                reason=f"relay answered {e.code} {e.message}",
            )
        except Stopped:
            raise
        except Exception as e:  # unreachable, reset, timed out — or the client failed: a new connection
            with contextlib.suppress(Exception):
                client.close()
            client = self._client()
            return Result(m.delivery_id, "retry", reason=f"relay unreachable: {type(e).__name__}: {e}"[:300])
        finally:
            self._pool.put_nowait(client)

    def parse_receipts(self, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        receipts = []
        for event in self.verified_json(body, headers, "events"):
            try:
                kind = str(event["event"])
                delivery_id = str(event["message_id"]).strip("<>").split("@", 1)[0]
            except (KeyError, TypeError) as e:
                raise SchemaError(f"events: malformed event: {e}") from e
            if kind not in EVENT_STATUS:
                raise SchemaError(f"events: unknown event {kind!r}")
            status = EVENT_STATUS[kind]
            if status is not None:
                receipts.append(Receipt(delivery_id, status, str(event["message_id"])))
        return receipts

    async def close(self) -> None:
        while not self._pool.empty():
            client = self._pool.get_nowait()
            if client.is_connected:
                with contextlib.suppress(Exception):
                    await client.quit()
