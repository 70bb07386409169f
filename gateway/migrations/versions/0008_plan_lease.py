"""Instances sharing a broadcast: leases on planning, and claims on deliveries.

An advisory version is planned by one instance at a time.

``planner`` names the instance planning it and ``plan_lease_until`` until when; the holder renews the
lease with every page, and another instance takes the advisory over (from its stored cursor) once
the lease has run out — its holder died — or was released (a graceful stop).

A delivery to a partner without idempotency keys (SMTP, SMPP) is claimed by the instance about to
send it (``claimed_by``, ``claimed_until``): the same delivery in two chunks handled by two instances
goes out once (gateway/dispatch.py).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("advisories", sa.Column("planner", sa.String(128)))
    op.add_column("advisories", sa.Column("plan_lease_until", sa.DateTime(timezone=True)))
    op.add_column("deliveries", sa.Column("claimed_by", sa.String(128)))
    op.add_column("deliveries", sa.Column("claimed_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("deliveries", "claimed_until")
    op.drop_column("deliveries", "claimed_by")
    with op.batch_alter_table("advisories") as batch:
        batch.drop_column("plan_lease_until")
        batch.drop_column("planner")
