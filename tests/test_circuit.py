"""The circuit breaker: opens on consecutive failures, holds requests while open, lets one probe
through when half-open, and closes on the probe's success; throttles do not count."""

from __future__ import annotations

import asyncio

from gateway.circuit import Circuit, CircuitSettings, State


def _circuit(failures: int = 3, open_s: float = 0.2) -> Circuit:
    return Circuit("push", CircuitSettings(failures_to_open=failures, open_s=open_s, max_open_s=1.0))


async def test_it_opens_after_consecutive_failures_only() -> None:
    c = _circuit(failures=3)
    c.failure()
    c.failure()
    c.success()  # a success in between: the count starts again
    c.failure()
    c.failure()
    assert c.state is State.CLOSED
    assert c.allows_now
    c.failure()
    assert c.state is State.OPEN
    assert not c.allows_now
    assert c.opened == 1


async def test_an_open_circuit_holds_requests_then_lets_one_probe_through() -> None:
    c = _circuit(failures=1, open_s=0.2)
    c.failure()
    first = asyncio.create_task(c.admit())
    second = asyncio.create_task(c.admit())
    await asyncio.sleep(0.05)  # well inside the open period: nobody may have been admitted
    assert not first.done()
    assert not second.done()
    done, pending = await asyncio.wait([first, second], return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    assert done.pop().result() is True
    assert c.state is State.HALF_OPEN
    c.success()
    assert await asyncio.wait_for(pending.pop(), 1.0) is False  # closed: the rest go, not as probes
    assert c.state is State.CLOSED


async def test_a_failed_probe_opens_it_again_for_longer() -> None:
    c = _circuit(failures=1, open_s=0.1)
    c.failure()
    assert await asyncio.wait_for(c.admit(), 1.0) is True
    c.failure()
    assert c.state is State.OPEN
    assert c.opened == 2
    assert c._open_for == 0.2  # doubled, up to max_open_s
    assert await asyncio.wait_for(c.admit(), 1.0) is True
    c.success()
    assert c._open_for == 0.1


async def test_an_abandoned_probe_lets_the_next_waiter_probe() -> None:
    c = _circuit(failures=1, open_s=0.05)
    c.failure()
    assert await asyncio.wait_for(c.admit(), 1.0) is True
    waiter = asyncio.create_task(c.admit())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    c.probe_abandoned()
    assert await asyncio.wait_for(waiter, 1.0) is True
