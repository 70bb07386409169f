"""Partner-side segments: one delivery per advisory version × channel × segment × language.

A segment is an audience the partner holds (docs/partner-push-api.md, "Segments"): the gateway sends
one request per language and the partner fans out to its users, reporting aggregate receipts
(targeted, delivered, read, failed, cancelled) that are kept here beside the request's own status.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "segment_deliveries",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("advisory_id", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("segment", sa.String(128), nullable=False),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("is_default", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("languages", sa.String(500), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("partner_id", sa.String(128)),
        sa.Column("replaces", sa.String(128)),
        sa.Column("reason", sa.String(500)),
        sa.Column("cancel", sa.String(16)),
        sa.Column("targeted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("delivered", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("read", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("cancelled", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("final", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("advisory_id", "version", "channel", "segment", "language"),
    )
    op.create_index("ix_segment_deliveries_status", "segment_deliveries", ["status"])
    op.create_index("ix_segment_deliveries_partner_id", "segment_deliveries", ["partner_id"])


def downgrade() -> None:
    op.drop_index("ix_segment_deliveries_partner_id", "segment_deliveries")
    op.drop_index("ix_segment_deliveries_status", "segment_deliveries")
    op.drop_table("segment_deliveries")
