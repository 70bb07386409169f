"""Receipts held until the partner id they name is recorded.

A partner may report a message before the gateway has written down the partner's own answer to the
send: an SMSC's delivery receipt can overtake the write of its ``submit_sm_resp``, a mail relay's
event the write of its 250. Such a receipt names a partner id no delivery has yet. It was counted as
unmatched and lost; now it is held in ``held_receipts`` and applied once the partner id is recorded,
or given up (counted unmatched) after ``receipts.hold_s``.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "held_receipts",
        sa.Column("channel", sa.String(32), primary_key=True),
        sa.Column("partner_id", sa.String(128), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("held_receipts")
