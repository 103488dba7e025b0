"""``morag-pipeline db``: the server's database: bring it up to date, copy a SQLite store into it.

The database is ``MORAG_DATABASE_URL`` when set (PostgreSQL), else the SQLite
file in ``MORAG_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.config import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``db`` and its actions to the CLI's subcommands."""
    db = commands.add_parser("db", help="the server's database: upgrade it, copy a SQLite store into it")
    actions = db.add_subparsers(dest="db_action", required=True, metavar="ACTION")
    actions.add_parser("upgrade", help="apply every migration the database lacks (the server does at start)")
    copy = actions.add_parser(
        "migrate-from-sqlite", help="copy a SQLite task store (tasks.db) into the configured database"
    )
    copy.add_argument("file", type=Path, metavar="FILE", help="the SQLite task store to copy from")
    copy.add_argument("--json", action="store_true")


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline import migrations
    from pipeline.db import DatabaseError, engine_for

    if args.db_action == "upgrade":
        engine = engine_for(settings)
        print(f"{engine.dialect.name} database at revision {migrations.current(engine)} (the newest)")
        return 0
    from pipeline.dbcopy import copy_sqlite_store

    if settings.database_url is None:
        raise DatabaseError("set MORAG_DATABASE_URL=postgresql://... to the database to copy into")
    copied = copy_sqlite_store(args.file, engine_for(settings))
    if args.json:
        print(json.dumps(copied))
    else:
        rows = ", ".join(f"{name} {count}" for name, count in copied.items() if count)
        print(f"copied {args.file}: {rows or 'no rows'}")
    return 0


COMMANDS = {"db": cmd_db}
