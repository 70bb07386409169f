"""Sequence numbers that never run out, and that SQLite never hands out twice.

- PostgreSQL: ``delivery_events.seq``, ``receipts.seq`` and ``delivery_count_deltas.seq`` were
  ``serial`` — 32-bit, with sequences that stop at 2,147,483,647. A broadcast of ten million makes
  some thirty million events and twenty million receipts, so a busy deployment would run out within
  years; the next insert would then fail, and with it (the events' triggers are in the same
  transaction) every status change of every delivery. They are now ``bigint``, their sequences too.
  Changing a column's type rewrites its table under an exclusive lock: on a deployment whose
  receipts log holds many millions of rows this takes minutes, with every receipt waiting. Upgrade
  such a store in a quiet hour (``store.migrate: refuse``, then ``broadcast-gateway db upgrade``).
- SQLite: ``delivery_events.seq`` is ``AUTOINCREMENT``. Without it SQLite numbered a new row after the
  greatest one left, so once the publisher had emptied the outbox the numbers began again at 1: a
  consumer saw ``seq`` go backwards, and a second publisher on the same file, deleting "every event up
  to the last one it took", could delete new events that had been given old numbers (lost, not
  published). The table is copied to change it.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_TABLES = ("delivery_events", "receipts", "delivery_count_deltas")


def _sequence(table: str) -> str:
    serial = sa.text("SELECT pg_get_serial_sequence(:t, 'seq')")
    return str(op.get_bind().execute(serial, {"t": table}).scalar_one())


def _copy_sqlite_outbox(autoincrement: bool) -> None:
    """Copy ``delivery_events`` (SQLite cannot alter a table's key). The events' triggers on
    ``deliveries`` name it, and SQLite refuses to rename a table into place while a trigger names a
    table that is gone: they are set aside and made again as they were."""
    bind = op.get_bind()
    triggers = bind.execute(
        sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND sql LIKE '%delivery_events%'")
    ).all()
    for name, _ in triggers:
        op.execute(f'DROP TRIGGER "{name}"')
    with op.batch_alter_table(
        "delivery_events", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
    ):
        pass
    for _, sql in triggers:
        op.execute(sql)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in _TABLES:
            op.alter_column(table, "seq", type_=sa.BigInteger, existing_type=sa.Integer)
            op.execute(f"ALTER SEQUENCE {_sequence(table)} AS bigint")  # its maximum goes with its type
        return
    _copy_sqlite_outbox(autoincrement=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in _TABLES:
            op.execute(f"ALTER SEQUENCE {_sequence(table)} AS integer")
            op.alter_column(table, "seq", type_=sa.Integer, existing_type=sa.BigInteger)
        return
    _copy_sqlite_outbox(autoincrement=False)
