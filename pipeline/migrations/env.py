"""Alembic's environment: runs the migrations on the engine ``pipeline.migrations.config`` names."""

from __future__ import annotations

from alembic import context

from pipeline.schema import metadata

engine = context.config.attributes.get("engine")
if engine is None:  # the ``alembic`` command itself: the configured database
    from pipeline.config import get_settings
    from pipeline.db import _create, database_target, database_url

    engine = _create(database_url(database_target(get_settings())))

with engine.connect() as connection:
    # Migrations run in one write transaction (taken at once on SQLite): two
    # processes opening a new database one after the other both find it ready.
    connection.execution_options(immediate=True)
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
