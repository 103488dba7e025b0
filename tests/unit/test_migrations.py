"""The database's schema is versioned: Alembic migrations bring any database to the newest
revision, a SQLite file of the release before migrations is adopted with every row, and
``morag-pipeline db`` upgrades a database and copies a SQLite store into PostgreSQL."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from pipeline import migrations
from pipeline.db import engine_for
from pipeline.fleet.registry import Registry
from pipeline.health import PartLog
from pipeline.schema import metadata
from pipeline.security.apikeys import ApiKeyStore
from pipeline.security.tokens import TokenStore
from pipeline.store import State, Task, TaskStore, new_task_id
from tests.conftest import free_port
from tests.unit.test_cli import one_line_error, run_cli

RELEASE_SCHEMA = Path(__file__).parent / "data" / "release_schema.sql"
SECRET = b"s" * 48
T0 = 1_000_000.0


def rows(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table of a SQLite file, in a stable order."""
    db = sqlite3.connect(path)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        skip = {"sqlite_sequence", "alembic_version"}
        return {
            n: sorted(db.execute(f"SELECT * FROM {n}").fetchall(), key=repr) for n in names if n not in skip
        }
    finally:
        db.close()


def schema_differences(target: Path | str) -> list:
    with engine_for(target).connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), metadata)


def primary_key_nullability(change: list | tuple) -> bool:
    """A primary key column the release declared without NOT NULL (``id TEXT PRIMARY KEY``), which
    SQLite reports as nullable: the key is unique and always written, so rows read the same."""
    if not isinstance(change, list) or len(change) != 1:
        return False
    kind, _, table, column, *_ = change[0]
    return kind == "modify_nullable" and metadata.tables[table].c[column].primary_key


def test_a_new_database_is_created_at_the_newest_revision_with_the_schema_exactly(
    database: Path | str,
) -> None:
    TaskStore(database)
    assert migrations.current(engine_for(database)) == migrations.head()
    assert schema_differences(database) == []


def test_a_database_of_the_release_before_migrations_is_adopted_losing_nothing(tmp_path: Path) -> None:
    """Tables present, no alembic_version: the file is stamped at the first revision and
    upgraded; every row reads as before and the schema is the newest one."""
    path = tmp_path / "tasks.db"
    old = sqlite3.connect(path)
    old.executescript(RELEASE_SCHEMA.read_text())
    old.executescript(
        "INSERT INTO tasks (id, kind, state, filename, input, options, route, created_at, updated_at,"
        " published_at, deliveries)"
        " VALUES ('t1', 'convert', 'done', 'a.md', '{}', '{}', '{\"queue\": \"cpu\"}', 1.5, 2.5, 1.5, 1);"
        "INSERT INTO events (task_id, ts, event, detail) VALUES ('t1', 1.5, 'submitted', '{}');"
        "INSERT INTO events (task_id, ts, event, detail) VALUES ('t1', 2.5, 'done', '{\"worker\": \"w\"}');"
        "INSERT INTO worker_tokens (id, worker, capability, issued_at, expires_at)"
        " VALUES ('k', 'w', 'cpu', 1, 9e9);"
        "INSERT INTO api_keys (id, name, role, digest, created_at) VALUES ('a', 'ci', 'admin', 'd', 1);"
        "INSERT INTO seen_nonces (nonce, ts) VALUES ('n', 1);"
        "INSERT INTO server_parts (name, at, detail) VALUES ('sweep', 3, '{}');"
    )
    old.commit()
    old.close()
    before = rows(path)

    store = TaskStore(path)

    assert migrations.current(engine_for(path)) == migrations.head()
    after = rows(path)
    assert {name: after[name] for name in before} == before
    assert all(after[name] == [] for name in set(after) - set(before))  # tables of later revisions
    assert [c for c in schema_differences(path) if not primary_key_nullability(c)] == []
    task = store.get("t1")
    assert (task.state, [e["event"] for e in task.events]) == (State.done, ["submitted", "done"])
    store.add_event("t1", "noted")  # the event ids go on from the adopted ones
    assert [e["event"] for e in store.get("t1").events] == ["submitted", "done", "noted"]


def test_db_upgrade_brings_the_configured_database_to_the_newest_revision(tmp_path: Path) -> None:
    proc = run_cli("db", "upgrade", MORAG_DATA_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert migrations.head() in proc.stdout
    assert migrations.current(engine_for(tmp_path / "tasks.db")) == migrations.head()


@pytest.mark.postgresql
def test_replicas_starting_at_once_on_an_empty_postgresql_database_migrate_it_once(
    tmp_path: Path, postgres_url: str
) -> None:
    """Several processes open a new PostgreSQL database at the same moment (replicas started
    together): they take turns under an advisory lock, each ends at the newest revision, and the
    schema is exactly the declared one."""
    with ThreadPoolExecutor(4) as pool:
        runs = list(
            pool.map(
                lambda n: run_cli(
                    "db",
                    "upgrade",
                    MORAG_DATA_DIR=str(tmp_path / f"replica-{n}"),
                    MORAG_DATABASE_URL=postgres_url,
                ),  # fmt: skip
                range(4),
            )
        )
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
        assert migrations.head() in proc.stdout
    assert migrations.current(engine_for(postgres_url)) == migrations.head()
    assert schema_differences(postgres_url) == []


def test_a_database_url_that_is_not_postgresql_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = run_cli("db", "upgrade", MORAG_DATA_DIR=str(tmp_path), MORAG_DATABASE_URL="mysql://db/x")
    assert "MORAG_DATABASE_URL must be postgresql://" in one_line_error(proc)


def test_a_database_that_cannot_be_reached_is_one_line_naming_it_without_its_password(tmp_path: Path) -> None:
    url = f"postgresql://morag:hunter2@127.0.0.1:{free_port()}/tasks"
    proc = run_cli("db", "upgrade", MORAG_DATA_DIR=str(tmp_path), MORAG_DATABASE_URL=url)
    line = one_line_error(proc)
    assert "cannot open the database" in line and f"127.0.0.1:{url.split(':')[3]}" in line
    assert "hunter2" not in line


def filled_sqlite_store(path: Path) -> list[str]:
    """A SQLite task store with a task in every state, tokens, API keys and registry rows."""
    store = TaskStore(path)
    ids = []
    for state in State:
        task = store.create(
            Task(
                new_task_id(),
                "convert",
                State.queued,
                f"{state}.md",
                {"p": state.value},
                {},
                {"queue": "cpu"},
            )
        )
        store.mark_published(task.id, f"m-{state}", "cpu", by="submit")
        if state is not State.queued:
            store.mark_running(task.id, "cpu-1", 1, nonce=f"run-{state}")
            store.set_progress(task.id, {"stage": "convert", "percent": 50.0})
        if state is State.done:
            store.mark_done(task.id, [{"name": "out.md"}], {"pages": 1}, "cpu-1", nonce="done")
        elif state is State.failed:
            store.mark_failed(task.id, "bad pdf", "cpu-1")
        elif state is State.canceled:
            store.mark_canceled(task.id, "user asked")
        ids.append(task.id)
    store.add_uploaded_bytes("key-1", 20000, 1234)
    tokens = TokenStore(path, SECRET)
    tokens.issue("cpu-1", "cpu", 3600)
    tokens.revoke(tokens.issue("gpu-1", "gpu", 3600)[1].id)
    keys = ApiKeyStore(path)
    keys.create("ci", "client")
    keys.revoke(keys.create("old", "admin")[1].id)
    registry = Registry(path, stale_after=30, dead_after=120)
    beat = {"worker": "cpu-1", "session": "s1", "queues": ["cpu"], "pid": 7, "current": [ids[1]]}
    registry.heartbeat(beat, now=T0)
    registry.heartbeat({**beat, "worker": "gpu-1", "queues": ["gpu"]}, now=T0)
    registry.goodbye({**beat, "worker": "gpu-1", "queues": ["gpu"]}, now=T0 + 1)
    registry.advance(T0 + 40)
    registry.refused("rogue", "bad signature", "heartbeat")
    PartLog(path).mark("sweep", {"changes": 0}, at=T0)
    return ids


@pytest.mark.postgresql
def test_migrate_from_sqlite_copies_every_table_and_each_task_reads_the_same(
    tmp_path: Path, postgres_url: str
) -> None:
    source = tmp_path / "old" / "tasks.db"
    ids = filled_sqlite_store(source)
    env = {"MORAG_DATA_DIR": str(tmp_path / "data"), "MORAG_DATABASE_URL": postgres_url}

    proc = run_cli("db", "migrate-from-sqlite", str(source), **env)

    assert proc.returncode == 0, proc.stderr
    assert "tasks 5" in proc.stdout
    before, after = TaskStore(source), TaskStore(postgres_url)
    for task_id in ids:
        assert after.get(task_id).to_dict() == before.get(task_id).to_dict()
    assert {t.state for t in after.list()} == set(State)
    assert after.counts() == before.counts()
    assert after.seen("done") and after.uploaded_bytes("key-1", 20000) == 1234
    assert [vars(r) for r in TokenStore(postgres_url, SECRET).list()] == [
        vars(r) for r in TokenStore(source, SECRET).list()
    ]
    assert ApiKeyStore(postgres_url).list() == ApiKeyStore(source).list()
    old_registry, new_registry = (
        Registry(db, stale_after=30, dead_after=120) for db in (source, postgres_url)
    )
    assert [r.to_dict() for r in new_registry.list(T0 + 50)] == [
        r.to_dict() for r in old_registry.list(T0 + 50)
    ]
    assert new_registry.history("cpu-1") == old_registry.history("cpu-1")
    assert new_registry.refusals(0) == old_registry.refusals(0)
    assert PartLog(postgres_url).last("sweep") == (T0, {"changes": 0})
    after.add_event(ids[0], "noted")  # the copy goes on: new events follow the copied ones
    assert after.get(ids[0]).events[-1]["event"] == "noted"

    again = run_cli("db", "migrate-from-sqlite", str(source), **env)
    assert "already holds 5 tasks" in one_line_error(again)


@pytest.mark.postgresql
def test_migrate_from_sqlite_refuses_a_missing_file_in_one_line(tmp_path: Path, postgres_url: str) -> None:
    proc = run_cli(
        "db", "migrate-from-sqlite", str(tmp_path / "nope.db"),
        MORAG_DATA_DIR=str(tmp_path), MORAG_DATABASE_URL=postgres_url,
    )  # fmt: skip
    assert "no such file" in one_line_error(proc)


def test_migrate_from_sqlite_needs_a_target_database(tmp_path: Path) -> None:
    TaskStore(tmp_path / "old.db")
    proc = run_cli("db", "migrate-from-sqlite", str(tmp_path / "old.db"), MORAG_DATA_DIR=str(tmp_path))
    assert "set MORAG_DATABASE_URL" in one_line_error(proc)
