"""Indexes for a broadcast of millions: an audience read in id order, and no index nobody reads.

- ``ix_recipients_country_id`` (country, id) replaces ``ix_recipients_country``: the planner reads
  an audience a page at a time in recipient id order after a cursor. With the country alone SQLite
  found every recipient of the country past the cursor and sorted them all for each page (0.18 s a
  page at 500,000 left of a million; the planner set the pace of the whole broadcast); with
  (country, id) a page is a range of the index, already in order (8 ms).
- ``ix_receipts_delivery_id`` is dropped: nothing reads ``receipts`` by delivery (it is the log of
  what partners reported), and every receipt wrote into a random place of that index.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_recipients_country_id", "recipients", ["country", "id"])
    op.drop_index("ix_recipients_country", "recipients")
    op.drop_index("ix_receipts_delivery_id", "receipts")


def downgrade() -> None:
    op.create_index("ix_receipts_delivery_id", "receipts", ["delivery_id"])
    op.create_index("ix_recipients_country", "recipients", ["country"])
    op.drop_index("ix_recipients_country_id", "recipients")
