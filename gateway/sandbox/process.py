"""Start ``broadcast-gateway sandbox`` as its own process and talk to its control API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from types import TracebackType
from typing import Any

import aiohttp


class SandboxProcess:
    def __init__(
        self,
        secret: str,
        gateway_url: str | None = None,
        receipt_delay_s: float = 0.5,
        segment_size: int = 1_000_000,
    ) -> None:
        self.secret = secret
        self.segment_size = segment_size
        self.gateway_url = gateway_url
        self.receipt_delay_s = receipt_delay_s
        self.port = 0
        self.smtp_port = 0
        self.smpp_port = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "sandbox",
            "--port",
            "0",
            "--smtp-port",
            "0",
            "--smpp-port",
            "0",
            "--receipt-delay",
            str(self.receipt_delay_s),
            "--segment-size",
            str(self.segment_size),
        ]
        if self.gateway_url:
            cmd += ["--gateway-url", self.gateway_url]
        env = {**os.environ, "SANDBOX_SECRET": self.secret, "GATEWAY__LOGGING__LEVEL": "warning"}
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, env=env
        )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        if not line:
            raise RuntimeError(f"sandbox exited with {await self._proc.wait()} before it was ready")
        ready = json.loads(line)
        self.port, self.smtp_port, self.smpp_port = (
            int(ready["http_port"]),
            int(ready["smtp_port"]),
            int(ready["smpp_port"]),
        )

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()

    def gateway_env(self) -> dict[str, str]:
        """GATEWAY__ variables that point every channel of a gateway at this sandbox."""
        return {
            "GATEWAY__CHANNELS__PUSH__BASE_URL": self.url,
            "GATEWAY__CHANNELS__PUSH__SECRET": self.secret,
            "GATEWAY__CHANNELS__SMS_HTTP__BASE_URL": self.url,
            "GATEWAY__CHANNELS__SMS_HTTP__SECRET": self.secret,
            "GATEWAY__CHANNELS__EMAIL__PORT": str(self.smtp_port),
            "GATEWAY__CHANNELS__EMAIL__SECRET": self.secret,
            "GATEWAY__CHANNELS__SMPP__PORT": str(self.smpp_port),
            "GATEWAY__CHANNELS__SMPP__PASSWORD": self.secret[:8],  # SMPP passwords: 8 characters
        }

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, self.url + path, json=body, timeout=aiohttp.ClientTimeout(total=10)
            ) as resp,
        ):
            resp.raise_for_status()
            result: dict[str, Any] = await resp.json()
            return result

    async def stats(self, since: float | None = None) -> dict[str, Any]:
        """Every partner's counts; with ``since`` (epoch seconds), also what each accepted after it."""
        return await self._call("GET", "/stats" + (f"?since={since}" if since is not None else ""))

    async def recipients(self, channel: str, advisory_key: str) -> set[str]:
        """Who ``channel``'s partner accepted a message for, for advisory ``id@vN``."""
        body = await self._call("GET", f"/stats/recipients?channel={channel}&advisory={advisory_key}")
        return set(body["recipients"])

    async def faults(self, channel: str = "push", **fault: Any) -> dict[str, Any]:
        return await self._call("POST", f"/control/{channel}/faults", fault)

    async def configure(self, channel: str = "push", **config: Any) -> dict[str, Any]:
        """Per partner: receipt_url, receipt_delay_s, receipt_status, receipts (false: none sent)."""
        return await self._call("POST", f"/control/{channel}/config", config)

    async def point_at(self, gateway_url: str | None) -> dict[str, Any]:
        """Send every partner's receipts to ``<gateway_url>/receipts/<channel>`` (None: hold them)."""
        return await self._call("POST", "/control/gateway", {"url": gateway_url})

    async def __aenter__(self) -> SandboxProcess:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
