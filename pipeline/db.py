"""The server's database: one SQLAlchemy engine per database, per process.

The task store lives in the SQLite file ``Settings.db_path`` (WAL mode, a 30 s
busy timeout) unless ``Settings.database_url`` names a PostgreSQL database.
``Database`` is what the stores hold: reads on a pooled connection, writes in
one transaction each (on SQLite taken at once, ``BEGIN IMMEDIATE``, so writers
queue instead of failing). Opening a database brings its schema to the newest
Alembic revision (``pipeline.migrations``). Each committed write wakes the
readers of this process that wait for one (``Changes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

from pipeline.config import Settings
from pipeline.errors import PipelineError

#: Seconds a SQLite writer waits for another's transaction before giving up.
SQLITE_BUSY_TIMEOUT_S = 30


class DatabaseError(PipelineError):
    """The database setting or the database itself cannot be used; the message says why."""


def database_target(settings: Settings) -> str | Path:
    """What the stores open: the PostgreSQL URL when set, else the SQLite file."""
    if settings.database_url is not None and settings.database_url.get_secret_value().strip():
        return settings.database_url.get_secret_value().strip()
    return settings.db_path


def database_url(target: str | Path) -> URL:
    """The SQLAlchemy URL of a SQLite file (a Path) or a ``sqlite://`` / ``postgresql://`` URL."""
    if isinstance(target, Path):
        return URL.create("sqlite", database=str(target))
    try:
        url = make_url(target)
    except Exception:
        raise DatabaseError(
            "MORAG_DATABASE_URL is not a database URL: use postgresql://user:password@host:5432/name"
        ) from None
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return url.set(drivername="postgresql+psycopg")
    if url.drivername == "sqlite" and url.database:
        return url
    raise DatabaseError(
        f"MORAG_DATABASE_URL must be postgresql://... (or empty for the SQLite file), not {url.drivername}://"
    )


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def engine_for(target: str | Path | Settings) -> Engine:
    """This process's engine for a database (created on first use, its schema brought up to date)."""
    if isinstance(target, Settings):
        target = database_target(target)
    url = database_url(target)
    key = url.render_as_string(hide_password=False)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _create(url)
            from pipeline.migrations import upgrade

            try:
                upgrade(engine)
            except OperationalError as exc:
                engine.dispose()
                reason = " ".join(line.strip() for line in str(exc.orig or exc).strip().splitlines())
                where = url.render_as_string(hide_password=True)
                raise DatabaseError(f"cannot open the database {where}: {reason}") from None
            _engines[key] = engine
        return engine


def forget_engine(target: str | Path) -> None:
    """Close this process's connections to a database and forget its engine (before dropping it)."""
    key = database_url(target).render_as_string(hide_password=False)
    with _engines_lock:
        engine = _engines.pop(key, None)
    if engine is not None:
        engine.dispose()


def _create(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            # As many connections as threads use it at once (a file: no server to spare);
            # five are kept open between uses.
            pool_size=5,
            max_overflow=-1,
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # A server's connections are counted (PostgreSQL's max_connections): at most 40 from
    # each process, a thread waiting for one to come free when all are in use.
    return create_engine(url, pool_size=10, max_overflow=30, pool_pre_ping=True)


def _sqlite_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # SQLAlchemy, not the sqlite3 module, says where transactions begin (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get("immediate", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _forget_after_fork() -> None:
    """A forked child opens its own connections: the parent's stay the parent's."""
    for engine in _engines.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_after_fork)


class Changes:
    """Wakes what waits in this process for the database to change, as soon as a write commits.

    An event stream (``pipeline.api.events``) reads the store again and again; between
    two reads it waits on its ``Changes.watch()`` event, which a write committed by
    this process sets at once. Writes by other processes (another server replica)
    wake nobody: the stream finds them at its next read, as it would without this.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}

    def notify(self) -> None:
        """Set every watcher's event (from any thread)."""
        with self._lock:
            watchers = list(self._watchers.items())
        for changed, loop in watchers:
            with contextlib.suppress(RuntimeError):  # its loop closed; it is forgotten when its watch ends
                loop.call_soon_threadsafe(changed.set)

    @contextmanager
    def watch(self) -> Iterator[asyncio.Event]:
        """An event of the running loop, set by each write committed while the block runs."""
        event = asyncio.Event()
        with self._lock:
            self._watchers[event] = asyncio.get_running_loop()
        try:
            yield event
        finally:
            with self._lock:
                self._watchers.pop(event, None)


_changes: dict[int, Changes] = {}


class Database:
    """The server's database as the stores use it.

    Parameters:
      target: the SQLite file (a Path), a database URL, or the settings naming either.
    """

    def __init__(self, target: str | Path | Settings) -> None:
        self.engine = engine_for(target)
        self.dialect = self.engine.dialect.name
        with _engines_lock:  # one per engine: every store of this process on it wakes the same watchers
            self.changes = _changes.setdefault(id(self.engine), Changes())

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reading (its snapshot ends when the block does)."""
        with self.engine.connect() as connection:
            yield connection

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction, committed at the end of the block, rolled back on error."""
        with self.engine.connect() as connection:
            connection.execution_options(immediate=True)
            with connection.begin():
                yield connection
        self.changes.notify()

    def insert(self, table: Table) -> PgInsert | SqliteInsert:
        """An INSERT with this dialect's ``on_conflict_do_update`` / ``on_conflict_do_nothing``."""
        return dialect_insert(self.dialect, table)


def dialect_insert(dialect: str, table: Table) -> PgInsert | SqliteInsert:
    """An INSERT into ``table`` that can say what a conflict does, for ``dialect`` (sqlite, postgresql)."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
