"""Progress in a terminal (``status``, ``status --follow``, the demo): a table of counts per channel
and status, with a bar per channel of how many deliveries are final."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.progress_bar import ProgressBar
from rich.table import Table

from gateway.models import FINAL, SEGMENT_COUNTS, Status

_FINAL = {s.value for s in FINAL}


def settled(counts: Mapping[str, Mapping[str, int]]) -> bool:
    """Whether every delivery counted is final (nothing planned, queued or sent without a receipt)."""
    return bool(counts) and all(s in _FINAL for per in counts.values() for s in per)


def table(counts: Mapping[str, Mapping[str, int]], title: str) -> Table:
    """Channels × statuses, a bar per channel (final of all), and a total row."""
    statuses = [s.value for s in Status if any(s.value in per for per in counts.values())]
    out = Table(title=title)
    out.add_column("channel")
    out.add_column("final", min_width=22)
    for s in statuses:
        out.add_column(s, justify="right")
    totals = {s: 0 for s in statuses}
    for channel, per in sorted(counts.items()):
        total = sum(per.values())
        done = sum(n for s, n in per.items() if s in _FINAL)
        bar = ProgressBar(total=max(total, 1), completed=done, width=12)
        out.add_row(channel, _with(bar, f" {done}/{total}"), *(str(per.get(s, 0)) for s in statuses))
        for s in statuses:
            totals[s] += per.get(s, 0)
    if len(counts) > 1:
        out.add_row("all", "", *(str(totals[s]) for s in statuses), style="bold")
    return out


def _with(bar: ProgressBar, text: str) -> Table:
    grid = Table.grid()
    grid.add_row(bar, text)
    return grid


def segments_table(segments: Sequence[Mapping[str, Any]], title: str) -> Table:
    """Partner-side segments: one row per request (version × channel × segment × language), with the
    partner's aggregate counts of its users beside our request's status."""
    out = Table(title=f"{title}: partner segments (the partner's counts of its users)")
    for name in ("v", "channel", "segment", "language", "request", *SEGMENT_COUNTS):
        out.add_column(name, justify="right" if name in SEGMENT_COUNTS or name == "v" else "left")
    for s in segments:
        language = s["language"] + (" (default)" if s["default_language"] else "")
        out.add_row(
            str(s["version"]),
            s["channel"],
            s["segment"],
            language,
            s["status"] + ("" if not s["final"] else ", final"),
            *(f"{int(s[k]):,}" for k in SEGMENT_COUNTS),
        )
    return out
