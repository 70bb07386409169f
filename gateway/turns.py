"""Taking turns: the rule both the planner and every dispatch lane schedule by.

Work is kept as ``{priority: {advisory key: item}}``; the next item is the first of the lowest
priority number that has any, and its advisory then goes to the back of that priority's line — so
urgent work always goes first and advisories of equal priority share fairly.
"""

from __future__ import annotations

from collections import OrderedDict
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
