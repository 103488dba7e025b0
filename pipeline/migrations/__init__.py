"""Alembic migrations of the server's database (``pipeline.schema``).

``upgrade`` brings a database to the newest revision; every store calls it
(through ``pipeline.db.engine_for``) when it first opens a database in a
process, and ``morag-pipeline db upgrade`` runs it on its own. A SQLite file
written by a release before migrations (its tables, no ``alembic_version``)
is adopted by the first revision: it creates only what is missing (tables,
indexes, the columns added since the first release), keeps every row, and
the file is then at that revision like any other.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

HERE = Path(__file__).parent


def config(engine: Engine | None = None) -> Config:
    """Alembic's configuration for this package's migrations (``engine``: the database to work on)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["engine"] = engine
    return cfg


@cache
def head() -> str:
    """The newest revision."""
    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    """The revision the database is at; None when it has none (empty, or written before migrations)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Bring the database to the newest revision; returns it."""
    if current(engine) != head():
        command.upgrade(config(engine), "head")
    return head()
