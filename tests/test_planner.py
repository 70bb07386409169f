"""Planner: the store is its schedule — an advisory stored by any intake (here: straight into the
store, as another gateway process's intake would) is planned and sent without a restart."""

from __future__ import annotations

from pathlib import Path

from gateway.app import Gateway
from gateway.lifecycle import AdvisoryState
from gateway.models import Advisory
from gateway.sandbox.process import SandboxProcess
from tests.conftest import advisory, eventually, load_recipients, reached


async def test_an_advisory_stored_by_another_process_is_planned_without_a_restart(
    gateway: Gateway, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    await load_recipients(gateway, tmp_path, 50)
    assert gateway.store is not None
    adv = Advisory.model_validate(advisory())
    accepted = await gateway.store.accept(adv, adv.model_dump(mode="json"), {})
    assert accepted.state is AdvisoryState.ACTIVE
    await eventually(lambda: reached(gateway, adv.id, "delivered", 50), what="planned, sent and delivered")
    assert await gateway.store.plan_finished(adv.id, 1)
