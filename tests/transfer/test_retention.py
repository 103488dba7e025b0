"""Files of finished tasks are removed after the retention time; the CLI shows and prunes the store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.cli import store_cmd
from pipeline.config import Settings
from pipeline.store import State, Task, TaskStore
from pipeline.transfer.local import LocalStore
from pipeline.transfer.retention import ORPHAN, RetentionSweeper, prune_store, task_folders

HOUR = 3600.0


def make_task(tasks: TaskStore, files: LocalStore, task_id: str, state: State, size: int = 1000) -> None:
    tasks.create(Task(task_id, "transcribe", State.queued, "talk.mp4", {}, {}, {}))
    if state is State.running:
        tasks.mark_running(task_id, "w", 1)
    elif state is State.done:
        tasks.mark_done(task_id, [], {}, "w")
    elif state is State.failed:
        tasks.mark_failed(task_id, "broken", "w")
    for kind in ("input", "output"):
        path = files.resolve(f"tasks/{task_id}/{kind}/file.bin")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


@pytest.fixture
def stores(tmp_path: Path) -> tuple[TaskStore, LocalStore]:
    tasks, files = TaskStore(tmp_path / "tasks.db"), LocalStore(tmp_path / "files")
    for task_id, state in [("done1", State.done), ("failed1", State.failed), ("run1", State.running),
                           ("queued1", State.queued)]:  # fmt: skip
        make_task(tasks, files, task_id, state)
    orphan = files.resolve("tasks/orphan1/input/upload.bin")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"y" * 10)
    return tasks, files


def test_prune_removes_finished_tasks_past_retention(
    stores: tuple[TaskStore, LocalStore],
) -> None:
    tasks, files = stores
    assert prune_store(tasks, files, 2 * HOUR).tasks == []  # everything is recent
    later = time.time() + 3 * HOUR
    dry = prune_store(tasks, files, 2 * HOUR, now=later, dry_run=True)
    assert sorted(dry.tasks) == ["done1", "failed1", "orphan1"]
    assert files.task_dir("done1").exists()

    report = prune_store(tasks, files, 2 * HOUR, now=later)
    assert sorted(report.tasks) == ["done1", "failed1", "orphan1"]
    assert report.files == 5 and report.bytes == 4010
    assert sorted(f.task_id for f in task_folders(tasks, files)) == ["queued1", "run1"]
    assert tasks.get("done1").state is State.done  # the record stays


def test_task_folders_report_state_and_size(stores: tuple[TaskStore, LocalStore]) -> None:
    tasks, files = stores
    found = {f.task_id: f for f in task_folders(tasks, files)}
    assert found["done1"].state == "done" and found["done1"].bytes == 2000 and found["done1"].files == 2
    assert found["orphan1"].state == ORPHAN and found["orphan1"].finished_at is None


def test_sweeper_prunes_in_the_background(stores: tuple[TaskStore, LocalStore]) -> None:
    tasks, files = stores
    sweeper = RetentionSweeper(tasks, files, retention_s=0.0, interval_s=60)
    sweeper.start()
    deadline = time.monotonic() + 10
    while files.task_dir("done1").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    sweeper.stop()
    assert not files.task_dir("done1").exists()
    assert files.task_dir("run1").exists()


def run_cli(settings: Settings, *argv: str) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    store_cmd.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["store", *argv])
    return store_cmd.COMMANDS[args.command](args, settings)


def test_cli_usage_and_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(data_dir=tmp_path, store_retention_hours=1)
    tasks, files = TaskStore(settings.db_path), LocalStore(settings.files_dir)
    make_task(tasks, files, "done1", State.done, size=1500)
    make_task(tasks, files, "run1", State.running)

    assert run_cli(settings, "usage", "--json") == 0
    usage = json.loads(capsys.readouterr().out)
    assert usage["files"] == 4 and usage["bytes"] == 5000 and usage["tasks"] == 2
    assert usage["by_state"]["done"] == {"tasks": 1, "bytes": 3000}
    assert usage["prunable"] == {"tasks": 0, "bytes": 0}

    assert run_cli(settings, "usage") == 0
    assert "4 files, 5.0 KB in 2 task folders" in capsys.readouterr().out

    assert run_cli(settings, "prune", "--older-than", "0", "--dry-run") == 0
    assert "would remove 2 files, 3.0 KB of 1 tasks" in capsys.readouterr().out
    assert files.task_dir("done1").exists()
    assert run_cli(settings, "prune", "--older-than", "0", "--json") == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == ["done1"]
    assert not files.task_dir("done1").exists() and files.task_dir("run1").exists()


def test_cli_host_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(data_dir=tmp_path)
    assert run_cli(settings, "host-key") == 0
    first = capsys.readouterr().out
    assert "fingerprint: SHA256:" in first and "MORAG_SFTP_HOST_KEY=SHA256:" in first
    assert run_cli(settings, "host-key") == 0
    assert capsys.readouterr().out == first  # made once, then kept
