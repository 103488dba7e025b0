"""The task store: states, events, and finished tasks that stay finished, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from pipeline.errors import TaskNotFound
from pipeline.store import State, Task, TaskStore, new_task_id


@pytest.fixture
def store(database: Path | str) -> TaskStore:
    return TaskStore(database)


def make(store: TaskStore) -> Task:
    task = Task(new_task_id(), "transcribe", State.queued, "a.mp3", {"path": "x"}, {}, {"queue": "gpu"})
    return store.create(task)


def test_life_of_a_task(store: TaskStore) -> None:
    task = make(store)
    assert store.mark_running(task.id, "w1", 1)
    store.set_progress(task.id, {"stage": "transcribing", "percent": 40.0})
    assert store.get(task.id).progress["percent"] == 40.0
    assert store.mark_done(task.id, [{"format": "txt"}], {"language": "en"}, "w1")
    done = store.get(task.id)
    assert done.state == State.done
    assert done.finished_at >= done.started_at >= done.created_at
    assert [e["event"] for e in done.events] == ["submitted", "started", "done"]


def test_done_is_recorded_once(store: TaskStore) -> None:
    task = make(store)
    assert store.mark_done(task.id, [{"format": "txt", "n": 1}], {}, "w1")
    assert not store.mark_done(task.id, [{"format": "txt", "n": 2}], {}, "w2")
    assert not store.mark_failed(task.id, "late failure", "w3")
    assert not store.mark_running(task.id, "w4", 2)
    final = store.get(task.id)
    assert final.outputs == [{"format": "txt", "n": 1}] and final.worker == "w1"
    assert [e["event"] for e in final.events].count("done") == 1


def test_progress_ignored_after_the_end(store: TaskStore) -> None:
    task = make(store)
    store.mark_failed(task.id, "corrupt", "w1")
    store.set_progress(task.id, {"stage": "transcribing", "percent": 50})
    assert store.get(task.id).progress == {}


def test_listing_and_counts(store: TaskStore) -> None:
    tasks = [make(store) for _ in range(3)]
    store.mark_failed(tasks[0].id, "bad", None)
    assert store.counts() == {"queued": 2, "running": 0, "done": 0, "failed": 1, "canceled": 0}
    assert [t.id for t in store.list(state=State.failed)] == [tasks[0].id]
    assert len(store.list(limit=2)) == 2


def test_unknown_task(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound):
        store.get("nope")


def test_a_message_is_applied_once_and_a_failed_attempt_leaves_no_replay_record(store: TaskStore) -> None:
    """The nonce of a control message is written with its effect: a handler that failed can be
    retried (not refused as a replay), and one that succeeded changes nothing the second time."""
    task = make(store)
    with pytest.raises(IntegrityError):  # the handler fails: an event for an unknown task
        store.add_event("no-such-task", "retrying", {}, nonce="n-1")
    assert not store.seen("n-1")
    store.add_event(task.id, "retrying", {}, nonce="n-1")  # the retry of the same message
    store.add_event(task.id, "retrying", {}, nonce="n-1")  # delivered once more: a no-op
    assert store.seen("n-1")
    assert [e["event"] for e in store.get(task.id).events].count("retrying") == 1
    assert store.mark_done(task.id, [], {}, "w1", nonce="n-2")
    assert not store.mark_done(task.id, [], {}, "w1", nonce="n-2")


def test_outbox_holds_tasks_until_published(store: TaskStore) -> None:
    task = make(store)
    assert [t.id for t in store.unpublished(created_before=time.time() + 1)] == [task.id]
    assert store.mark_published(task.id, "m-1", "gpu", by="submit")
    assert store.unpublished(created_before=time.time() + 1) == []
    again = store.get(task.id)
    assert again.deliveries == 1 and again.published_at is not None
    assert store.requeue(task.id, {"reason": "lost"}, unpublished=True)
    assert [t.id for t in store.unpublished(created_before=time.time() + 1)] == [task.id]


def test_an_old_database_opens_with_its_tasks_published(tmp_path: Path) -> None:
    """A database from before the outbox: its tasks count as published, none is sent twice."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE tasks (id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL,"
        " filename TEXT NOT NULL, input TEXT NOT NULL, options TEXT NOT NULL, route TEXT NOT NULL,"
        " progress TEXT NOT NULL DEFAULT '{}', outputs TEXT NOT NULL DEFAULT '[]',"
        " result TEXT NOT NULL DEFAULT '{}', error TEXT, worker TEXT, attempts INTEGER NOT NULL DEFAULT 0,"
        " created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL);"
        "INSERT INTO tasks (id, kind, state, filename, input, options, route, created_at, updated_at)"
        " VALUES ('t1', 'convert', 'queued', 'a.md', '{}', '{}', '{}', 1.0, 1.0);"
    )
    old.commit()
    old.close()
    store = TaskStore(path)
    assert store.unpublished(created_before=time.time()) == []
    assert store.get("t1").published_at == 1.0


def test_a_committed_write_wakes_the_event_streams_of_this_process(store: TaskStore) -> None:
    """An event stream waits on ``db.changes`` between its reads: a task's outcome, written by the
    server's control consumer in another thread, wakes it at once; nothing else does."""
    other = TaskStore(store.db.engine.url.render_as_string(hide_password=False))  # another store, one engine
    task = make(store)

    async def follow() -> tuple[bool, bool]:
        with other.db.changes.watch() as changed:
            quiet = not await _woken(changed, 0.3)  # nothing written: no wake-up
            writer = threading.Thread(target=store.mark_running, args=(task.id, "w1", 1))
            writer.start()
            woken = await _woken(changed, 10.0)
            writer.join()
            return quiet, woken

    assert asyncio.run(follow()) == (True, True)
    assert store.get(task.id).state == State.running


async def _woken(changed: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(changed.wait(), seconds)
    except TimeoutError:
        return False
    return True
