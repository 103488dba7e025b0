"""Server-side retention: files of finished tasks are removed after a while.

A task's folder (``tasks/<id>/``, input and outputs) is removed once the task
is done, failed or canceled and finished longer than the retention time ago;
its record stays in the task store. A folder no task record names (an upload
that never became a task) is removed once nothing in it changed for as long.
Running and queued tasks are never touched.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import TaskNotFound
from pipeline.logs import get_logger
from pipeline.store import FINAL_STATES, TaskStore
from pipeline.transfer.local import LocalStore

logger = get_logger(__name__)

#: What a folder without a task record is called in reports.
ORPHAN = "orphan"


@dataclass
class FolderUsage:
    """One task folder: its task's state (or ``orphan``), when it finished or last changed, its size."""

    task_id: str
    state: str
    finished_at: float | None
    changed_at: float
    files: int
    bytes: int


@dataclass
class PruneReport:
    """What a prune removed (or, in a dry run, would remove)."""

    tasks: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


def _measure(folder: Path) -> tuple[int, int, float]:
    """(files, bytes, newest modification time) of everything under ``folder``."""
    files = size = 0
    newest = folder.stat().st_mtime
    for parent, dirs, names in os.walk(folder):
        for name in dirs + names:
            try:
                info = os.lstat(os.path.join(parent, name))
            except FileNotFoundError:
                continue
            newest = max(newest, info.st_mtime)
            if name in names:
                files += 1
                size += info.st_size
    return files, size, newest


def task_folders(tasks: TaskStore, files: LocalStore) -> list[FolderUsage]:
    """Every task folder in the store with its task's state and size."""
    found = []
    root = files.root / "tasks"
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not entry.is_dir() or entry.is_symlink():
            continue
        try:
            count, size, changed = _measure(entry)
        except FileNotFoundError:
            continue
        try:
            task = tasks.get(entry.name, events=False)
            state, finished = task.state.value, task.finished_at
        except TaskNotFound:
            state, finished = ORPHAN, None
        found.append(FolderUsage(entry.name, state, finished, changed, count, size))
    return found


def expired(folder: FolderUsage, cutoff: float) -> bool:
    """Whether a folder may go: its task finished (an orphan: last changed) before ``cutoff``."""
    if folder.state == ORPHAN:
        return folder.changed_at < cutoff
    if folder.state not in FINAL_STATES:
        return False
    return (folder.finished_at or folder.changed_at) < cutoff


def prune_store(
    tasks: TaskStore,
    files: LocalStore,
    older_than_s: float,
    *,
    now: float | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Remove the files of tasks finished more than ``older_than_s`` seconds ago."""
    cutoff = (time.time() if now is None else now) - older_than_s
    report = PruneReport()
    for folder in task_folders(tasks, files):
        if not expired(folder, cutoff):
            continue
        if not dry_run:
            files.remove_task(folder.task_id)
        report.tasks.append(folder.task_id)
        report.files += folder.files
        report.bytes += folder.bytes
    if report.tasks and not dry_run:
        logger.info(
            "store pruned",
            extra={"tasks": len(report.tasks), "files": report.files, "bytes": report.bytes},
        )
    return report


class RetentionSweeper:
    """Prunes the store in a background thread, every ``interval_s`` seconds.

    Parameters:
      tasks: the task store (who finished when).
      files: the file store to prune.
      retention_s: how long files of a finished task are kept.
      interval_s: seconds between sweeps.
    """

    def __init__(
        self, tasks: TaskStore, files: LocalStore, retention_s: float, interval_s: float = 3600.0
    ) -> None:
        self.tasks = tasks
        self.files = files
        self.retention_s = retention_s
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                prune_store(self.tasks, self.files, self.retention_s)
            except Exception:
                logger.exception("store prune failed")
            self._stop.wait(self.interval_s)
