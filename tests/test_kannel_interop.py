"""Interoperability: Kannel (an independent SMPP implementation, from Debian) binds to the sandbox
SMSC that our SMPP adapter is tested against, sends a concatenated Kazakh message, and gets our
deliver_sm receipt back as a delivery report. Skipped without Kannel; required when CI=true."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from gateway.broker import free_port, wait_for_port
from gateway.sandbox.process import SandboxProcess
from tests.conftest import eventually

TEXT = "Елден шығыңыз: өткізу пункті ашық. Консулдық жедел желі: +7 7172 00 00 00. " * 2


def _kannel() -> tuple[str, str]:
    bearerbox, smsbox = shutil.which("bearerbox"), shutil.which("smsbox")
    if not (bearerbox and smsbox):
        if os.environ.get("CI") == "true":
            pytest.fail("Kannel is required when CI=true (.ci/run installs Debian's kannel)")
        pytest.skip("Kannel (bearerbox, smsbox) not installed: apt-get install kannel")
    return bearerbox, smsbox


@pytest_asyncio.fixture
async def kannel(sandbox: SandboxProcess, secret: str, tmp_path: Path) -> AsyncIterator[int]:
    """Kannel bound to the sandbox SMSC; yields its sendsms port."""
    bearerbox, smsbox = _kannel()
    admin, box, sendsms = free_port(), free_port(), free_port()
    conf = tmp_path / "kannel.conf"
    conf.write_text(
        f"""group = core
admin-port = {admin}
admin-password = admin
smsbox-port = {box}
box-allow-ip = 127.0.0.1
dlr-storage = internal
log-file = "{tmp_path}/bearerbox.log"

group = smsc
smsc = smpp
smsc-id = sandbox
host = 127.0.0.1
port = {sandbox.smpp_port}
transceiver-mode = true
system-type = ""
smsc-username = gateway
smsc-password = {secret[:8]}
source-addr-ton = 5
source-addr-npi = 0
dest-addr-ton = 1
dest-addr-npi = 1

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {box}
sendsms-port = {sendsms}
log-file = "{tmp_path}/smsbox.log"

group = sendsms-user
username = gateway
password = test
concatenation = true
max-messages = 10
""",
        encoding="utf-8",
    )
    procs = []
    try:
        # smsbox connects to bearerbox at start and gives up if it is not there yet: start in order
        for binary, listens_on in ((bearerbox, box), (smsbox, sendsms)):
            procs.append(
                await asyncio.create_subprocess_exec(
                    binary, str(conf), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
                )
            )
            await wait_for_port("127.0.0.1", listens_on, within_s=20)

        async def bound() -> bool:
            return int((await sandbox.stats())["channels"]["smpp"]["binds"]) >= 1

        await eventually(bound, within=20, what="Kannel bound to the sandbox SMSC")
        yield sendsms
    finally:
        for proc in reversed(procs):
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


async def test_kannel_sends_a_concatenated_kazakh_sms_and_gets_our_delivery_report(
    kannel: int, sandbox: SandboxProcess
) -> None:
    reports: asyncio.Queue[str] = asyncio.Queue()

    async def dlr(request: web.Request) -> web.Response:
        await reports.put(request.query["status"])
        return web.Response(text="ok")

    app = web.Application()
    app.add_routes([web.get("/dlr", dlr)])
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        params = {
            "username": "gateway",
            "password": "test",
            "from": "MFA",
            "to": "+77011234567",
            "charset": "UTF-8",
            "coding": "2",
            "text": TEXT,
            "dlr-mask": "1",
            "dlr-url": f"http://127.0.0.1:{port}/dlr?status=%d",
        }
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{kannel}/cgi-bin/sendsms", params=params) as resp,
        ):
            assert resp.status == 202, await resp.text()
        async with asyncio.timeout(30):
            assert await reports.get() == "1", "Kannel matched our deliver_sm to its message: delivered"
    finally:
        await runner.cleanup()
    stats = (await sandbox.stats())["channels"]["smpp"]
    assert stats["parts"] >= 2, "Kannel concatenated with UDH"
    assert stats["encodings"] == {"ucs2": 1}
    reassembled = hashlib.sha256(TEXT.encode()).hexdigest()[:12]
    assert stats["by_advisory"][reassembled]["accepted"] == 1, (
        "the sandbox reassembled Kannel's parts exactly"
    )
