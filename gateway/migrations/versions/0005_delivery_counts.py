"""Counts that do not scan: per advisory × version × channel × language × status, kept by the
database itself as deliveries move, in the same transaction as the move (triggers), so that every
progress view costs the same at a hundred or ten million deliveries.

- ``deliveries.language``: the language a delivery is (to be) rendered in, chosen at planning.
- ``delivery_counts``: the counters.
- SQLite (one writer at a time): row triggers add to and take from ``delivery_counts`` directly.
- PostgreSQL (concurrent writers): statement triggers append one aggregated row per key and
  statement to ``delivery_count_deltas`` (appends never wait for each other, and cannot deadlock as
  counter rows updated in two orders could); the sweeper folds them into ``delivery_counts``
  (``Store.fold_counts``) and a read adds what is not folded yet.

A database that had deliveries before is counted once here (language unknown: "").
A later migration that rebuilds ``deliveries`` on SQLite (batch mode copies the table) drops its
triggers and must create them again (``SQLITE`` below).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SQLITE = [
    """CREATE TRIGGER deliveries_counted_insert AFTER INSERT ON deliveries BEGIN
        INSERT INTO delivery_counts (advisory_id, version, channel, language, status, n)
        VALUES (new.advisory_id, new.version, new.channel, new.language, new.status, 1)
        ON CONFLICT (advisory_id, version, channel, language, status) DO UPDATE SET n = n + 1;
    END""",
    """CREATE TRIGGER deliveries_counted_update AFTER UPDATE OF status ON deliveries
    WHEN old.status <> new.status BEGIN
        UPDATE delivery_counts SET n = n - 1
        WHERE advisory_id = old.advisory_id AND version = old.version AND channel = old.channel
          AND language = old.language AND status = old.status;
        INSERT INTO delivery_counts (advisory_id, version, channel, language, status, n)
        VALUES (new.advisory_id, new.version, new.channel, new.language, new.status, 1)
        ON CONFLICT (advisory_id, version, channel, language, status) DO UPDATE SET n = n + 1;
    END""",
    """CREATE TRIGGER deliveries_counted_delete AFTER DELETE ON deliveries BEGIN
        UPDATE delivery_counts SET n = n - 1
        WHERE advisory_id = old.advisory_id AND version = old.version AND channel = old.channel
          AND language = old.language AND status = old.status;
    END""",
]

# the SQL below is built from these constant column names only (ruff S608 is about user input)
_COLS = "advisory_id, version, channel, language, status"
POSTGRESQL = [
    f"""CREATE FUNCTION deliveries_counted_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO delivery_count_deltas ({_COLS}, n)
        SELECT {_COLS}, count(*) FROM new_rows GROUP BY {_COLS};
        RETURN NULL;
    END $$""",
    f"""CREATE FUNCTION deliveries_counted_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO delivery_count_deltas ({_COLS}, n)
        SELECT {_COLS}, sum(n) FROM (
            SELECT o.advisory_id, o.version, o.channel, o.language, o.status, -1 AS n
            FROM old_rows o JOIN new_rows w ON w.id = o.id WHERE w.status <> o.status
            UNION ALL
            SELECT w.advisory_id, w.version, w.channel, w.language, w.status, 1 AS n
            FROM old_rows o JOIN new_rows w ON w.id = o.id WHERE w.status <> o.status
        ) moved GROUP BY {_COLS} HAVING sum(n) <> 0;
        RETURN NULL;
    END $$""",
    f"""CREATE FUNCTION deliveries_counted_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO delivery_count_deltas ({_COLS}, n)
        SELECT {_COLS}, -count(*) FROM old_rows GROUP BY {_COLS};
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER deliveries_counted_insert AFTER INSERT ON deliveries
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION deliveries_counted_insert()""",
    """CREATE TRIGGER deliveries_counted_update AFTER UPDATE ON deliveries
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION deliveries_counted_update()""",
    """CREATE TRIGGER deliveries_counted_delete AFTER DELETE ON deliveries
        REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION deliveries_counted_delete()""",
]


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("language", sa.String(16), nullable=False, server_default=""))
    op.create_table(
        "delivery_counts",
        sa.Column("advisory_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("channel", sa.String(32), primary_key=True),
        sa.Column("language", sa.String(16), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "delivery_count_deltas",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("advisory_id", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_delivery_count_deltas_advisory", "delivery_count_deltas", ["advisory_id", "version"])
    if op.get_bind().dialect.name == "postgresql":
        # rows come and go every fold: vacuum it often, so reads never wade through dead rows
        op.execute(
            "ALTER TABLE delivery_count_deltas SET (autovacuum_vacuum_scale_factor = 0, "
            "autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_cost_delay = 0)"
        )
    op.execute(
        f"INSERT INTO delivery_counts ({_COLS}, n) SELECT {_COLS}, count(*) FROM deliveries GROUP BY {_COLS}"
    )
    for statement in SQLITE if op.get_bind().dialect.name == "sqlite" else POSTGRESQL:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS deliveries_counted_{name}")
    else:
        for name in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS deliveries_counted_{name} ON deliveries")
            op.execute(f"DROP FUNCTION IF EXISTS deliveries_counted_{name}()")
    op.drop_index("ix_delivery_count_deltas_advisory", "delivery_count_deltas")
    op.drop_table("delivery_count_deltas")
    op.drop_table("delivery_counts")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("language")
