"""The schema of release 0.1.0 (main at 970bdd9), the last created without migrations.

A database made by that release has these tables and no ``alembic_version``: the store stamps it
with this revision and upgrades it from here.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "advisories",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("msg_type", sa.String(16), nullable=False),
        sa.Column("sender", sa.String(200), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="active"),
        sa.Column("planned", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("plan_cursor", sa.String(128), nullable=False, server_default=""),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "recipients",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("languages", sa.String(100), nullable=False, server_default=""),
        sa.Column("phone", sa.String(32)),
        sa.Column("email", sa.String(320)),
        sa.Column("app_user", sa.String(256)),
        sa.Column("country", sa.String(2)),
        sa.Column("region", sa.String(100)),
        sa.Column("tags", sa.String(1000), nullable=False, server_default=""),
        sa.Column("opt_outs", sa.String(200), nullable=False, server_default=""),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_recipients_country", "recipients", ["country"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("advisory_id", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("recipient_id", sa.String(128), nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("rank", sa.SmallInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("partner_id", sa.String(128)),
        sa.Column("reason", sa.String(500)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
        sa.Column("cascaded", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.UniqueConstraint("advisory_id", "version", "recipient_id", "channel"),
    )
    op.create_index("ix_deliveries_partner_id", "deliveries", ["partner_id"])
    op.create_index("ix_deliveries_advisory_status", "deliveries", ["advisory_id", "version", "status"])
    op.create_index("ix_deliveries_cascade", "deliveries", ["channel", "status", "cascaded"])
    op.create_index("ix_deliveries_status", "deliveries", ["status", "updated_at"])
    op.create_table(
        "withdrawals",
        sa.Column("advisory_id", sa.String(128), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("by_id", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "receipts",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("delivery_id", sa.String(32), nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("partner_id", sa.String(128)),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_receipts_delivery_id", "receipts", ["delivery_id"])


def downgrade() -> None:
    for table in ("receipts", "withdrawals", "deliveries", "recipients", "advisories"):
        op.drop_table(table)
