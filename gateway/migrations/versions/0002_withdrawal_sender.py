"""Withdrawals remember the sender that made them: a cancel that overtakes its alert applies to the
alert only if that sender has authority over the alert's sender (gateway/lifecycle.py). Rows from
before are kept with no sender and still apply (they were accepted under the old rule).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("withdrawals") as batch:
        batch.add_column(sa.Column("by_sender", sa.String(200)))


def downgrade() -> None:
    with op.batch_alter_table("withdrawals") as batch:
        batch.drop_column("by_sender")
