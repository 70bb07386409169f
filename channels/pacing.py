"""A partner's pace, urgent first: its rate as a token bucket, and its open requests as slots, both
of which serve an urgent batch before any bulk one that is waiting.

Every adapter keeps to the partner's ``rate_per_s`` (``burst`` at once) and ``max_in_flight``. In
plain arrival order an urgent batch waited behind every bulk batch already waiting: at an e-mail
relay's 200/s, four bulk batches of 50 held an urgent evacuation e-mail 1.2 s before its first
request (the priority drill on e-mail); at an SMSC's 50/s it would be 4 s. Here a waiting urgent
batch takes the next tokens and the next free slot; bulk batches keep their arrival order among
themselves. A batch already granted is not taken back. SMPP's window (``submit_sm`` awaiting their
answers) is ``Slots`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator


class Pace:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up (full at the start); a batch of
    ``n`` messages takes ``min(n, burst)``. Waiters are served by priority (lower first), then in
    arrival order; the one at the head is served as soon as its tokens are there."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at: float | None = None
        self._order = itertools.count()
        self._waiting: list[tuple[int, int, float, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now

    async def acquire(self, n: int, priority: int) -> None:
        loop = asyncio.get_running_loop()
        amount = float(min(n, self.burst))
        self._refill(loop.time())
        if not self._waiting and self._tokens >= amount:
            self._tokens -= amount
            return
        granted: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), amount, granted))
        self._serve()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._tokens += amount  # granted, then cancelled before it could go: not spent
            self._serve()
            raise

    def _serve(self) -> None:
        """Grant the head of the line while its tokens are there; otherwise wake when they will be."""
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            _, _, amount, granted = self._waiting[0]
            if granted.done():  # cancelled while waiting
                heapq.heappop(self._waiting)
                continue
            self._refill(loop.time())
            if self._tokens < amount:
                self._timer = loop.call_later((amount - self._tokens) / self.rate_per_s, self._serve)
                return
            heapq.heappop(self._waiting)
            self._tokens -= amount
            granted.set_result(None)


class Slots:
    """At most ``n`` held at once; a free slot goes to the waiting holder of the lowest priority
    number, then in arrival order."""

    def __init__(self, n: int) -> None:
        self.free = n
        self._order = itertools.count()
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self._waiting:
            self.free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), granted))
        try:
            await granted  # the slot is handed over by the holder that leaves it (``release``)
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # handed over, then cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, granted = heapq.heappop(self._waiting)
            if not granted.done():
                granted.set_result(None)
                return
        self.free += 1

    @contextlib.asynccontextmanager
    async def held(self, priority: int) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()
