"""``broadcast-gateway sandbox``: every sandbox partner in one process, with ``GET /stats``.

On start it prints one JSON line to stdout, ``{"ready": true, "http_port": ...}``, so that a parent
process (demo, tests) learns where it listens.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from gateway.cli import stop_on_signals
from gateway.logging import get_logger
from gateway.sandbox.push import PushPartner

log = get_logger(__name__)


def build(push: PushPartner) -> web.Application:
    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"channels": {push.channel: push.stats()}})

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.add_routes([web.get("/stats", stats), *push.routes()])
    return app


async def serve(host: str, port: int, secret: str, receipt_url: str | None, receipt_delay_s: float) -> None:
    push = PushPartner(secret, receipt_url, receipt_delay_s)
    await push.start()
    # a request held by the "hang" fault must not hold up shutdown
    runner = web.AppRunner(build(push), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1])
    sys.stdout.write(json.dumps({"ready": True, "http_port": bound}) + "\n")
    sys.stdout.flush()
    log.info("sandbox.started", port=bound, receipt_url=receipt_url)
    stop = asyncio.Event()
    stop_on_signals(stop)
    await stop.wait()
    await runner.cleanup()
    await push.stop()
