"""Delivery events out: an outbox of every applied status change of a delivery.

``delivery_events`` is filled in the same transaction as the change (triggers on ``deliveries``) and
emptied by the events publisher (gateway/events.py) once each row is on the ``delivery-events``
topic. The triggers are created and dropped by the gateway at start-up (``events.enabled``,
``Store.deliver_events``); this revision holds the table and, on PostgreSQL, the trigger functions.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_INTO = (
    "INSERT INTO delivery_events (delivery_id, advisory_id, version, channel, language, status, "
    "previous_status, reason, partner_id, at) "
)
POSTGRESQL = [
    f"""CREATE FUNCTION deliveries_evented_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        {_INTO}
        SELECT id, advisory_id, version, channel, language, status, NULL, reason, partner_id, updated_at
        FROM new_rows ORDER BY id;
        RETURN NULL;
    END $$""",
    f"""CREATE FUNCTION deliveries_evented_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        {_INTO}
        SELECT w.id, w.advisory_id, w.version, w.channel, w.language, w.status, o.status, w.reason,
               w.partner_id, w.updated_at
        FROM old_rows o JOIN new_rows w ON w.id = o.id WHERE w.status <> o.status ORDER BY w.id;
        RETURN NULL;
    END $$""",
]


def upgrade() -> None:
    op.create_table(
        "delivery_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("delivery_id", sa.String(32), nullable=False),
        sa.Column("advisory_id", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("previous_status", sa.String(16)),
        sa.Column("reason", sa.String(500)),
        sa.Column("partner_id", sa.String(128)),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        for statement in POSTGRESQL:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in ("insert", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS deliveries_evented_{name} ON deliveries")
            op.execute(f"DROP FUNCTION IF EXISTS deliveries_evented_{name}()")
    else:
        for name in ("insert", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS deliveries_evented_{name}")
    op.drop_table("delivery_events")
