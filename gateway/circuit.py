"""A circuit breaker per channel provider.

``closed``: requests flow. After ``failures_to_open`` consecutive failed requests (the partner was
unreachable, timed out or answered 5xx for the whole batch) the circuit **opens**: nothing is sent
to that provider for ``open_s`` seconds, and its deliveries wait — they are not failed and not
lost, and waiting costs them no attempt. Then it is **half-open**: one request goes through as a
probe. A success closes the circuit; a failure opens it again, for twice as long (up to
``max_open_s``). A throttle (HTTP 429) is the partner being healthy: it neither opens nor closes.

Each provider has its own circuit, and dispatch gives each channel its own lane, so an open circuit
never slows another channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from gateway import metrics
from gateway.logging import get_logger

log = get_logger(__name__)


class CircuitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # below dispatch.max_attempts (checked at start-up): the circuit must open before a delivery
    # can spend all its attempts on an outage
    failures_to_open: int = Field(3, ge=1)
    open_s: float = Field(2.0, gt=0)
    max_open_s: float = Field(30.0, gt=0)


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Circuit:
    def __init__(
        self, name: str, settings: CircuitSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.settings = settings
        self.clock = clock
        self.state = State.CLOSED
        self.failures = 0
        self.opened = 0  # how many times it opened (for drills and tests)
        self._open_for = settings.open_s
        self._opens_at = 0.0
        self._probing = False
        self._changed = asyncio.Event()

    @property
    def allows_now(self) -> bool:
        """Whether a request could go now without waiting."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            return self.clock() >= self._opens_at
        return not self._probing

    async def admit(self) -> bool:
        """Wait until a request may go; returns True if it is the half-open probe (its outcome
        decides the circuit, and a failed probe is the circuit's cost, not the delivery's)."""
        while True:
            if self.state is State.CLOSED:
                return False
            if self.state is State.OPEN:
                wait = self._opens_at - self.clock()
                if wait > 0:
                    await self._wait(wait)
                    continue
                self._set(State.HALF_OPEN)
            if not self._probing:
                self._probing = True
                return True
            await self._wait(None)

    async def _wait(self, seconds: float | None) -> None:
        """Until the state changes, or ``seconds`` (the rest of the open period) pass."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        if self.state is not State.CLOSED:
            self._open_for = self.settings.open_s
            self._set(State.CLOSED)
            log.info("channel.circuit_closed", channel=self.name)

    def failure(self) -> None:
        self.failures += 1
        if self.state is State.HALF_OPEN:
            self._probing = False
            self._open_for = min(self._open_for * 2, self.settings.max_open_s)
            self._open()
        elif self.state is State.CLOSED and self.failures >= self.settings.failures_to_open:
            self._open()

    def probe_abandoned(self) -> None:
        """The probe was not sent after all (its advisory was withdrawn): let another waiter probe."""
        if self._probing:
            self._probing = False
            self._changed.set()

    def _open(self) -> None:
        self.opened += 1
        self._opens_at = self.clock() + self._open_for
        self._set(State.OPEN)
        log.warning(
            "channel.circuit_opened", channel=self.name, failures=self.failures, open_s=self._open_for
        )

    def _set(self, state: State) -> None:
        self.state = state
        metrics.circuit_open.labels(self.name).set(0 if state is State.CLOSED else 1)
        self._changed.set()
