"""The ended tasks' figures kept between scrapes (``EndedTotals``) are what a full read of the
store gives: tasks that end between scrapes, and one whose end commits a while after its
timestamp, are each counted once."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import update

from pipeline.config import Settings
from pipeline.db import Database
from pipeline.exposition import render
from pipeline.fleet.registry import Registry
from pipeline.metrics import SETTLE_S, EndedTotals, collect
from pipeline.schema import tasks
from pipeline.store import State, Task, TaskStore, new_task_id


def figures(text: str) -> list[str]:
    """The task metrics of a rendering (the registry's ages change between calls)."""
    return [line for line in text.splitlines() if line.startswith(("morag_task", "morag_transfer"))]


def run_tasks(store: TaskStore, count: int, queue: str, fail: bool = False) -> list[str]:
    ids = []
    for n in range(count):
        task = store.create(Task(new_task_id(), "convert", State.queued, f"doc{n}.md", {}, {},
                                 {"queue": queue, "estimates": {f"{queue}_s": 2.0}}))  # fmt: skip
        store.mark_running(task.id, "w1", 1)
        if fail:
            store.mark_failed(task.id, "broken", "w1")
        else:
            transfer = {
                "download_s": 0.2 * n,
                "download_bytes": 1000 * n,
                "upload_s": 0.1,
                "upload_bytes": 10,
            }
            store.mark_done(task.id, [], {"transfer": transfer}, "w1")
        ids.append(task.id)
    return ids


def test_totals_kept_between_scrapes_match_a_full_read(database: Path | str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, dev_mode=True)
    store, db, registry = TaskStore(database), Database(database), Registry(database)

    def scrape(totals: EndedTotals | None, at: float) -> list[str]:
        return figures(render(collect(settings, db, registry, now=at, broker=False, totals=totals).families))

    early = run_tasks(store, 5, "cpu")
    with db.transaction() as conn:  # ended long ago
        conn.execute(update(tasks).where(tasks.c.id.in_(early)).values(finished_at=time.time() - 3600))
    totals = EndedTotals()
    now = time.time()
    assert scrape(totals, now) == scrape(None, now)

    # Tasks that end after the first scrape, one failed, and one whose end is written only now
    # though it is stamped before the last scrape (a transaction that took a while to commit).
    run_tasks(store, 4, "gpu")
    run_tasks(store, 1, "cpu", fail=True)
    [late] = run_tasks(store, 1, "cpu")
    with db.transaction() as conn:
        conn.execute(update(tasks).where(tasks.c.id == late).values(finished_at=now - SETTLE_S / 2))
    for later in (now + 1, now + 2 * SETTLE_S, now + 3 * SETTLE_S):
        kept, full = scrape(totals, later), scrape(None, later)
        assert kept == full
    assert 'morag_task_processing_seconds_count{queue_name="cpu",kind="convert"} 6' in kept
    assert 'morag_task_processing_seconds_count{queue_name="gpu",kind="convert"} 4' in kept
