"""Copying a SQLite task store into the configured database (``morag-pipeline db migrate-from-sqlite``).

Both databases are first brought to the newest revision, so their tables
match; then every table is copied in one transaction on the target, parents
before children. Event ids are given anew by the target, in the source's
order, so the target's own counters go on from there.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, func, select

from pipeline.db import DatabaseError, dialect_insert, engine_for
from pipeline.schema import metadata, tasks

#: Rows read and written at a time.
BATCH = 1000


def copy_sqlite_store(source: Path, target: Engine) -> dict[str, int]:
    """Copy every table of the SQLite file ``source`` into ``target``; the rows copied, per table.

    DatabaseError when ``source`` is not a task store, when it is the target
    itself, or when the target already holds tasks (copy into an empty database).
    """
    if not source.is_file():
        raise DatabaseError(f"{source}: no such file (name the tasks.db of the server's MORAG_DATA_DIR)")
    with source.open("rb") as file:
        if file.read(16) != b"SQLite format 3\x00":
            raise DatabaseError(f"{source}: not a SQLite database")
    if target.dialect.name == "sqlite" and Path(target.url.database or "").resolve() == source.resolve():
        raise DatabaseError(
            f"{source} is the configured database itself: set MORAG_DATABASE_URL to the target"
        )
    origin = engine_for(source)
    with target.connect() as db:
        held = db.execute(select(func.count()).select_from(tasks)).scalar_one()
    if held:
        raise DatabaseError(f"the target database already holds {held} tasks: migrate into an empty database")
    copied: dict[str, int] = {}
    with origin.connect() as reader, target.begin() as writer:
        for table in metadata.sorted_tables:
            serial = [c for c in table.primary_key.columns if c.autoincrement is True]
            columns = [c for c in table.columns if c not in serial]
            order = list(table.primary_key.columns)
            rows = reader.execute(select(*columns).order_by(*order))
            count = 0
            while batch := rows.fetchmany(BATCH):
                insert = dialect_insert(writer.dialect.name, table)
                writer.execute(insert.on_conflict_do_nothing(), [dict(row._mapping) for row in batch])
                count += len(batch)
            copied[table.name] = count
    return copied
