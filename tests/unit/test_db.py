"""The database engine: SQLite in WAL mode with its busy timeout, writers queued (not refused),
one engine per database per process, and a forked child with connections of its own."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from pipeline.db import Database, DatabaseError, database_url, engine_for
from pipeline.store import State, Task, TaskStore, new_task_id


def test_sqlite_is_in_wal_mode_with_a_30_second_busy_timeout(tmp_path: Path) -> None:
    with Database(tmp_path / "tasks.db").read() as db:
        assert db.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert db.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert db.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_second_writer_waits_for_the_first_and_both_writes_land(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "tasks.db")
    holding, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        with store.db.transaction():
            holding.set()
            release.wait(10)
        store.remember("first")

    def second() -> None:
        try:
            holding.wait(10)
            store.remember("second")  # blocks on the first's write lock, then goes in
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    holding.wait(10)
    release.set()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert store.seen("first") and store.seen("second")


def test_one_engine_per_database_per_process(tmp_path: Path) -> None:
    assert engine_for(tmp_path / "tasks.db") is engine_for(tmp_path / "tasks.db")
    assert engine_for(tmp_path / "tasks.db") is not engine_for(tmp_path / "other.db")


def _child_writes(path: Path, task_id: str, done: multiprocessing.Queue) -> None:
    TaskStore(path).mark_canceled(task_id, "canceled in the child")
    done.put(TaskStore(path).get(task_id).state.value)


def test_a_forked_child_uses_connections_of_its_own(tmp_path: Path) -> None:
    """The parent's pooled connections stay the parent's: a child writes, the parent reads it."""
    store = TaskStore(tmp_path / "tasks.db")
    task = store.create(Task(new_task_id(), "convert", State.queued, "a.md", {}, {}, {"queue": "cpu"}))
    assert store.get(task.id).state is State.queued  # the parent holds a pooled connection now
    context = multiprocessing.get_context("fork")
    done = context.Queue()
    child = context.Process(target=_child_writes, args=(tmp_path / "tasks.db", task.id, done))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert done.get(timeout=5) == "canceled"
    assert store.get(task.id).state is State.canceled


def test_only_postgresql_and_sqlite_urls_are_accepted() -> None:
    assert database_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    with pytest.raises(DatabaseError, match="must be postgresql://"):
        database_url("mysql://u@h/db")
