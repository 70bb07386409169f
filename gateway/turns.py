"""Taking turns: the rule both the planner and every dispatch lane schedule by, and urgent work
first on the event loop (``UrgentFirst``).

Work is kept as ``{priority: {advisory key: item}}``; the next item is the first of the lowest
priority number that has any, and its advisory then goes to the back of that priority's line — so
urgent work always goes first and advisories of equal priority share fairly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import TypeVar

V = TypeVar("V")


def take_turn(by_priority: dict[int, OrderedDict[str, V]]) -> tuple[str, V] | None:
    """The key and item whose turn it is (now moved to the back of its line), or None if all are empty."""
    for priority in sorted(by_priority):
        line = by_priority[priority]
        if line:
            key, item = next(iter(line.items()))
            line.move_to_end(key)
            return key, item
    return None


class UrgentFirst:
    """Bulk work steps aside while urgent work is in hand in this process.

    The store's write turns already put urgent writes first (gateway/store/sqlite.py ``working_for``), but
    the event loop has no priorities: under a bulk broadcast it ran bulk steps back to back, and each
    of an urgent advisory's dozen hand-overs (intake, planning, dispatch) waited 20-40 ms behind them.
    So urgent work *holds* this from the moment intake reads an urgent advisory, through its planning,
    until each of its chunks is dispatched; bulk work awaits ``bulk_turn`` between its steps (before a
    page is read or planned, before a chunk's work is read, its messages built or a batch sent) and
    goes on once nothing urgent is in hand. A step under way finishes first.

    A hold counts for its first ``grace_s`` only: urgent work still in hand after that is slow for
    another reason (a partner retried, a circuit open), and bulk work does not stop behind it.
    """

    def __init__(self, grace_s: float = 2.0) -> None:
        self.grace_s = grace_s
        self._holds: dict[int, float] = {}  # hold → when it was taken (loop time)
        self._next = 0
        self._waiting: list[asyncio.Future[None]] = []

    def hold(self) -> int:
        """Urgent work is in hand (until ``release`` of what this returns)."""
        self._next += 1
        self._holds[self._next] = asyncio.get_running_loop().time()
        return self._next

    def release(self, hold: int) -> None:
        self._holds.pop(hold, None)
        if not self._holds:
            for waiter in self._waiting:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiting.clear()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        hold = self.hold()
        try:
            yield
        finally:
            self.release(hold)

    async def bulk_turn(self) -> None:
        """Return once no urgent work taken in the last ``grace_s`` is in hand."""
        loop = asyncio.get_running_loop()
        while self._holds:
            newest = max(self._holds.values())
            left = newest + self.grace_s - loop.time()
            if left <= 0:
                return
            waiter = loop.create_future()
            self._waiting.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, left)
