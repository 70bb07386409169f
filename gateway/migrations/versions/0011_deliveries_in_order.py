"""Deliveries written in planning order, and indexed only where a query needs them.

A broadcast of a million wrote each delivery into random places of large indexes: its id (the
primary key) was a hash, and three more indexes held its status, so each of its moves (queued, sent,
delivered) rewrote entries of all three. SQLite's own statements for a million took 70 s here.

- ``seq``: a new primary key in planning order. A new delivery's id begins with it (the store makes
  ids; the hash of the advisory, version, recipient and channel follows), so the table and its
  id index grow at their ends. Existing rows keep their ids; their ``seq`` is their old row order.
- ``ux_deliveries_recipient`` (advisory, version, recipient, channel) replaces the unnamed unique
  constraint: the same rule, now also the index of an advisory's deliveries.
- Partial indexes instead of ``ix_deliveries_advisory_status``, ``ix_deliveries_cascade`` and
  ``ix_deliveries_status``: a delivery is in one only while it is pending, sent without a receipt,
  unconfirmed for the cascade, or failed; a broadcast's many delivered rows are in none.
- ``partner_refs`` instead of ``ix_deliveries_partner_id``: partner ids only of channels whose
  receipts name nothing else (SMPP, shared e-mails), looked up by (channel, partner id). The rows
  that had a partner id are copied in.

SQLite cannot change a primary key in place: the table is copied, and its counter triggers (0005),
which go with the old table, are made again; the events triggers are the gateway's own at start-up.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_COLUMNS = (
    "id, advisory_id, version, recipient_id, channel, status, rank, attempts, partner_id, reason, "
    "updated_at, sent_at, cascaded, language, claimed_by, claimed_until"
)
_PARTIAL = {
    "ix_deliveries_pending": (["advisory_id", "version"], "status IN ('planned', 'queued')"),
    "ix_deliveries_sent": (["sent_at"], "status = 'sent'"),
    "ix_deliveries_unconfirmed": (["channel"], "status IN ('unknown', 'failed') AND cascaded = false"),
    "ix_deliveries_failed": (["advisory_id", "version"], "status = 'failed'"),
}
_OLD_INDEXES = (
    "ix_deliveries_partner_id",
    "ix_deliveries_advisory_status",
    "ix_deliveries_cascade",
    "ix_deliveries_status",
)


def _counter_triggers() -> list[str]:
    """SQLite's counter triggers as revision 0005 made them (they go with the table copied here)."""
    return list(importlib.import_module("gateway.migrations.versions.0005_delivery_counts").SQLITE)


def _indexes() -> None:
    op.create_index("ux_deliveries_id", "deliveries", ["id"], unique=True)
    op.create_index(
        "ux_deliveries_recipient",
        "deliveries",
        ["advisory_id", "version", "recipient_id", "channel"],
        unique=True,
    )
    for name, (columns, where) in _PARTIAL.items():
        op.create_index(
            name, "deliveries", columns, sqlite_where=sa.text(where), postgresql_where=sa.text(where)
        )


def upgrade() -> None:
    op.create_table(
        "partner_refs",
        sa.Column("channel", sa.String(32), primary_key=True),
        sa.Column("partner_id", sa.String(128), primary_key=True),
        sa.Column("delivery_id", sa.String(32), nullable=False),
        sqlite_with_rowid=False,
    )
    op.execute(
        "INSERT INTO partner_refs (channel, partner_id, delivery_id) "
        "SELECT channel, partner_id, min(id) FROM deliveries WHERE partner_id IS NOT NULL "
        "GROUP BY channel, partner_id"
    )
    if op.get_bind().dialect.name == "sqlite":
        _upgrade_sqlite()
    else:
        _upgrade_postgresql()


def _upgrade_sqlite() -> None:
    op.create_table(
        "deliveries_0011",
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("id", sa.String(32), nullable=False),
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
        sa.Column("language", sa.String(16), nullable=False, server_default=""),
        sa.Column("claimed_by", sa.String(128)),
        sa.Column("claimed_until", sa.DateTime(timezone=True)),
    )
    op.execute(
        f"INSERT INTO deliveries_0011 (seq, {_COLUMNS}) "  # noqa: S608 -- constant column names
        f"SELECT rowid, {_COLUMNS} FROM deliveries ORDER BY rowid"
    )
    op.drop_table("deliveries")  # its indexes and triggers with it
    op.rename_table("deliveries_0011", "deliveries")
    _indexes()
    for statement in _counter_triggers():
        op.execute(statement)


def _upgrade_postgresql() -> None:
    for name in _OLD_INDEXES:
        op.drop_index(name, "deliveries")
    op.execute("ALTER TABLE deliveries ADD COLUMN seq BIGSERIAL")  # existing rows numbered here
    op.execute("ALTER TABLE deliveries DROP CONSTRAINT deliveries_pkey")
    op.execute("ALTER TABLE deliveries ADD PRIMARY KEY (seq)")
    op.execute(
        "ALTER TABLE deliveries DROP CONSTRAINT deliveries_advisory_id_version_recipient_id_channel_key"
    )
    _indexes()


def downgrade() -> None:
    for name in ("ux_deliveries_id", "ux_deliveries_recipient", *_PARTIAL):
        op.drop_index(name, "deliveries")
    with op.batch_alter_table("deliveries", recreate="always") as batch:
        batch.drop_column("seq")
        batch.create_primary_key("deliveries_pkey", ["id"])
        batch.create_unique_constraint(
            "deliveries_advisory_id_version_recipient_id_channel_key",
            ["advisory_id", "version", "recipient_id", "channel"],
        )
    op.create_index("ix_deliveries_partner_id", "deliveries", ["partner_id"])
    op.create_index("ix_deliveries_advisory_status", "deliveries", ["advisory_id", "version", "status"])
    op.create_index("ix_deliveries_cascade", "deliveries", ["channel", "status", "cascaded"])
    op.create_index("ix_deliveries_status", "deliveries", ["status", "updated_at"])
    if op.get_bind().dialect.name == "sqlite":
        for statement in _counter_triggers():
            op.execute(statement)
    op.drop_table("partner_refs")
