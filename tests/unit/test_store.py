"""The task store: states, events, and finished tasks that stay finished."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import TaskNotFound
from pipeline.store import State, Task, TaskStore, new_task_id


@pytest.fixture
def store(tmp_path: Path) -> TaskStore:
    return TaskStore(tmp_path / "tasks.db")


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
