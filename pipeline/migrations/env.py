"""Alembic's environment: runs the migrations on the engine ``pipeline.migrations.config`` names."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from pipeline.schema import metadata

engine = context.config.attributes.get("engine")
if engine is None:  # the ``alembic`` command itself: the configured database
    from pipeline.config import get_settings
    from pipeline.db import _create, database_target, database_url

    engine = _create(database_url(database_target(get_settings())))

#: The PostgreSQL advisory lock migrations hold ("morag-db" in ASCII): one process migrates at a time.
MIGRATION_LOCK = 0x6D6F7261672D6462

with engine.connect() as connection:
    # Migrations run in one write transaction, taken at once: on SQLite a
    # write lock; on PostgreSQL an advisory lock held until it commits. Two
    # processes opening a new database at the same moment migrate one after
    # the other, and the second finds it ready.
    connection.execution_options(immediate=True)
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
