"""Adapters are found by entry point (group ``broadcast_gateway.channels``), so a third party can
ship one as its own package: ``[project.entry-points."broadcast_gateway.channels"] name = "pkg.mod:Class"``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from channels.base import Adapter
from gateway.errors import ConfigError

GROUP = "broadcast_gateway.channels"


def available() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def adapter_class(name: str) -> type[Adapter]:
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        raise ConfigError(f"adapter {name!r} is not installed; installed: {sorted(available()) or 'none'}")
    cls = matches[0].load()
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise ConfigError(f"entry point {name!r} ({matches[0].value}) is not a channels.base.Adapter")
    return cls
