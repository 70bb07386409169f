"""Durable state: advisories, recipients, deliveries, receipts (SQLAlchemy Core, async).

SQLite (WAL) by default; PostgreSQL (asyncpg) with the same queries. Status changes are guarded by
rank (``Status.rank``) in the WHERE clause, so a late or repeated write never moves a delivery
backwards and concurrent writers cannot undo each other.

One module a table's queries, ``Store`` their sum:

- ``sqlite``: SQLite's plumbing. Its hot transactions (a planner page, a batch's results, a batch of
  receipts, the outbox emptied) are written by one writer thread with a connection of its own, a
  whole transaction per hand-over and a whole batch per statement; reads run whole in reader
  threads; both take turns, urgent work's first (``working_for``).
- ``base``: the engine and the ways to write (``_write``, ``_transact``, ``_begin``) and read.
- ``recipients``, ``advisories`` (and ``leases``: planning's), ``deliveries``, ``counts``,
  ``receipts``, ``segments``, ``outbox`` (the delivery events).
"""

from __future__ import annotations

from gateway.models import SEGMENT_COUNTS
from gateway.schema import metadata
from gateway.store.advisories import Accepted, AdvisoriesStore, By, Version
from gateway.store.counts import COUNT_KEY, Count, CountsStore
from gateway.store.deliveries import Outcome, Planned, WorkItem
from gateway.store.outbox import EVENT_SCHEMA, Event, OutboxStore
from gateway.store.receipts import AppliedReceipts, ReceiptsStore
from gateway.store.recipients import RecipientsStore
from gateway.store.segments import SegmentDelivery, SegmentsStore
from gateway.store.sqlite import working_for

__all__ = [
    "COUNT_KEY",
    "EVENT_SCHEMA",
    "SEGMENT_COUNTS",
    "Accepted",
    "AppliedReceipts",
    "By",
    "Count",
    "Event",
    "Outcome",
    "Planned",
    "SegmentDelivery",
    "Store",
    "Version",
    "WorkItem",
    "metadata",
    "working_for",
]


class Store(RecipientsStore, AdvisoriesStore, ReceiptsStore, CountsStore, SegmentsStore, OutboxStore):
    """The store: every table's queries (one class each, one module each), on one engine."""
