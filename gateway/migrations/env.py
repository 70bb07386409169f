"""Alembic environment: run on the connection the store hands over (``gateway/migrate.py``), so
migrations use the same engine, driver and SQLite pragmas as the service. Batch mode on SQLite
(its ALTER TABLE cannot change a column): one history serves SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import context

from gateway.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
