"""Two-person approval and training mode: who submitted each advisory version, and whether it is a
training advisory (only ever sent to the sandbox partners).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("advisories") as batch:
        batch.add_column(sa.Column("submitted_by", sa.String(200)))
        batch.add_column(sa.Column("training", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("advisories") as batch:
        batch.drop_column("training")
        batch.drop_column("submitted_by")
