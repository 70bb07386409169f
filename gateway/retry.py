"""Retry until the store or the broker is back: the one loop for infrastructure failures; and
``every``, the one loop for periodic work (sweeper, cascade, held receipts) that outlives them.

Input errors are never retried here (they are judged where they arise and go to a dead-letter
place); what reaches this loop is a database or broker failure, and the same work is tried again
after ``RETRY_DELAY_S`` until it succeeds or the gateway stops (``Stopped``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gateway.logging import get_logger

log = get_logger(__name__)

RETRY_DELAY_S = 2.0
T = TypeVar("T")


class Stopped(Exception):
    """The gateway is stopping: leave this work unfinished (and uncommitted) for the next consumer."""


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or raise Stopped as soon as ``stopping`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
    if stopping.is_set():
        raise Stopped


async def until_done(
    op: Callable[[], Awaitable[T]],
    event: str,
    stopping: asyncio.Event,
    delay_s: float = RETRY_DELAY_S,
    **fields: Any,
) -> T:
    """``await op()`` until it returns; each failure is logged as ``event`` with ``fields``."""
    while True:
        try:
            return await op()
        except Stopped:
            raise
        except Exception as e:  # the store or broker failed, not the input: same work again, later
            log.error(event, error=f"{type(e).__name__}: {e}"[:500], **fields)
            await pause(stopping, delay_s)


async def every(
    step: Callable[[], Awaitable[Any]], seconds: float, event: str, stopping: asyncio.Event
) -> None:
    """``await step()`` every ``seconds`` until ``stopping``; a failure (the store or broker is down)
    is logged as ``event`` and the step runs again next time."""
    while not stopping.is_set():
        try:
            await step()
        except Exception as e:
            log.error(event, error=f"{type(e).__name__}: {e}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)
