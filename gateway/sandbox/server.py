"""``broadcast-gateway sandbox``: every sandbox partner in one process, with ``GET /stats``.

Partners: push (HTTP), sms-http (HTTP aggregator), email (SMTP relay), smpp (SMSC). The HTTP and
e-mail partners send receipts to ``<gateway url>/receipts/<channel>``; the SMSC sends deliver_sm on
the SMPP session. On start it prints one JSON line to stdout, ``{"ready": true, "http_port": ...,
"smtp_port": ..., "smpp_port": ...}``, so that a parent process (demo, tests) learns where it listens.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from gateway.cli import stop_on_signals
from gateway.logging import get_logger
from gateway.sandbox.email import EmailSink
from gateway.sandbox.partner import SandboxPartner
from gateway.sandbox.push import PushPartner
from gateway.sandbox.smpp import Smsc
from gateway.sandbox.sms_http import SmsAggregator

log = get_logger(__name__)


def point_at(partners: list[SandboxPartner], gateway_url: str | None) -> None:
    for p in partners:
        p.receipt_url = f"{gateway_url.rstrip('/')}/receipts/{p.channel}" if gateway_url else None
        p.wake()


def build(partners: list[SandboxPartner]) -> web.Application:
    async def stats(request: web.Request) -> web.Response:
        since = request.query.get("since")
        at = float(since) if since else None
        return web.json_response({"channels": {p.channel: p.stats(at) for p in partners}})

    async def recipients(request: web.Request) -> web.Response:
        """The recipients a partner accepted a message for, for one advisory ("id@vN")."""
        by_channel = {p.channel: p for p in partners}
        partner = by_channel.get(request.query.get("channel", ""))
        if partner is None:
            return web.json_response({"error": f"channel: one of {sorted(by_channel)}"}, status=400)
        counted = partner.by_advisory.get(request.query.get("advisory", ""))
        return web.json_response({"recipients": sorted(counted.recipients) if counted else []})

    async def gateway(request: web.Request) -> web.Response:
        point_at(partners, (await request.json()).get("url"))
        return web.json_response({p.channel: p.receipt_url for p in partners})

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.add_routes(
        [
            web.get("/stats", stats),
            web.get("/stats/recipients", recipients),
            web.post("/control/gateway", gateway),
        ]
    )
    for p in partners:
        app.add_routes(p.routes())
    return app


async def serve(
    host: str,
    port: int,
    smtp_port: int,
    smpp_port: int,
    secret: str,
    gateway_url: str | None,
    receipt_delay_s: float,
    segment_size: int = 1_000_000,
) -> None:
    email = EmailSink(secret, None, receipt_delay_s)
    smsc = Smsc(secret, None, receipt_delay_s)
    partners: list[SandboxPartner] = [
        PushPartner(secret, None, receipt_delay_s, segment_size=segment_size),
        SmsAggregator(secret, None, receipt_delay_s),
        email,
        smsc,
    ]
    point_at(partners, gateway_url)
    for p in partners:
        await p.start()
    await email.start_smtp(host, smtp_port)
    await smsc.start_smpp(host, smpp_port)
    # a request held by the "hang" fault must not hold up shutdown
    runner = web.AppRunner(build(partners), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1])
    ready = {"ready": True, "http_port": bound, "smtp_port": email.smtp_port, "smpp_port": smsc.smpp_port}
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    log.info("sandbox.started", port=bound, gateway_url=gateway_url)
    stop = asyncio.Event()
    stop_on_signals(stop)
    await stop.wait()
    await runner.cleanup()
    for p in partners:
        await p.stop()
