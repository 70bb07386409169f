"""Training mode: a training advisory (``"training": true``, or CAP ``<status>`` Test or Exercise)
can only ever reach sandbox partners — the gateway's **own**, started on loopback as a child process
(``broadcast-gateway sandbox``) when the first training chunk is dispatched, with a secret made for
it. Dispatch chooses the adapters here for every training advisory (``Dispatcher.handle_chunk``):
the same adapter classes and settings as the live channels, with the partner's address and secret
replaced. No setting names where training messages go, so no configuration can send them to a
real partner. The sandbox's receipts come back to ``/training/receipts/<channel>``, signed with the
training secret, and move the training deliveries like any receipts.

A channel whose adapter has no sandbox partner (``sms-routed``) fails a training delivery with the
reason instead of sending it anywhere.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from channels import registry
from channels.base import Adapter, load_settings
from gateway.logging import get_logger
from gateway.receipts import ReceiptWebhook
from gateway.sandbox.process import SandboxProcess
from gateway.settings import Settings

log = get_logger(__name__)


def _overrides(sb: SandboxProcess) -> dict[str, dict[str, Any]]:
    """Per adapter: the settings that point it at the sandbox (and nowhere else)."""
    http = {"base_url": sb.url, "secret": sb.secret, "secret_file": None}
    return {
        "push": http,
        "sms-http": http,
        "email": {
            "host": "127.0.0.1",
            "port": sb.smtp_port,
            "secret": sb.secret,
            "secret_file": None,
            "use_tls": False,
            "start_tls": False,
            "username": None,
            "password": None,
            "password_file": None,
        },
        "smpp": {"host": "127.0.0.1", "port": sb.smpp_port, "password": sb.secret[:8], "password_file": None},
    }


class Training:
    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        webhook: Callable[[Mapping[str, Adapter]], ReceiptWebhook],
        public_url: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.session = session
        self.make_webhook = webhook
        self.public_url = public_url
        self.sandbox: SandboxProcess | None = None
        self.webhook: ReceiptWebhook | None = None
        self._adapters: dict[str, Adapter] | None = None
        self.unavailable: dict[str, str] = {}  # channel -> why training cannot use it
        self._lock = asyncio.Lock()

    async def adapters(self) -> Mapping[str, Adapter]:
        """The training adapters, the sandbox started on first use."""
        async with self._lock:
            if self._adapters is None:
                self._adapters = await self._start()
        return self._adapters

    async def _start(self) -> dict[str, Adapter]:
        sb = SandboxProcess(secrets.token_urlsafe(24), receipt_delay_s=self.settings.training.receipt_delay_s)
        await sb.start()
        self.sandbox = sb
        overrides = _overrides(sb)
        adapters: dict[str, Adapter] = {}
        for channel, raw in self.settings.channels.items():
            kind = str(raw.get("adapter", channel))
            if kind not in overrides:
                self.unavailable[channel] = f"training: adapter {kind!r} has no sandbox partner"
                continue
            cls = registry.adapter_class(kind)
            channel_settings = load_settings(cls.settings_model, channel, {**raw, **overrides[kind]})
            if channel_settings.enabled:
                adapters[channel] = cls(channel, channel_settings, self.session)
        self.webhook = self.make_webhook(adapters)
        for name, adapter in adapters.items():
            adapter.receipt_sink = self.webhook.sink(name, adapter)
        await sb.point_at(self.public_url() + "/training")
        log.info("training.sandbox_started", port=sb.port, channels=sorted(adapters))
        return adapters

    def routes(self) -> list[web.RouteDef]:
        async def receipts(request: web.Request) -> web.StreamResponse:
            if self.webhook is None:
                raise web.HTTPNotFound()
            return await self.webhook.handle(request)

        return [web.post("/training/receipts/{channel}", receipts)]

    async def close(self) -> None:
        for adapter in (self._adapters or {}).values():
            await adapter.close()
        if self.sandbox is not None:
            await self.sandbox.stop()
