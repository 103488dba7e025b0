"""Task folders left by dead worker processes are removed at the next worker start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dramatiq
from dramatiq.brokers.stub import StubBroker

from pipeline.jobs import TMP_PREFIX
from pipeline.middleware.temp_cleanup import TempCleanup
from pipeline.transfer.tempfiles import remove_leftovers, task_dir_prefix


def dead_pid() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def make(folder: Path, name: str, age_s: float = 0.0) -> Path:
    path = folder / name
    path.mkdir()
    (path / "input.mp4").write_bytes(b"partial download")
    if age_s:
        old = time.time() - age_s
        os.utime(path, (old, old))
    return path


def test_only_folders_of_dead_processes_go(tmp_path: Path) -> None:
    mine = make(tmp_path, f"{task_dir_prefix()}abc")
    dead = make(tmp_path, f"{task_dir_prefix(dead_pid())}def")
    parent = make(tmp_path, f"{task_dir_prefix(os.getppid())}ghi")  # a live process
    old_unowned = make(tmp_path, f"{TMP_PREFIX}jkl", age_s=3 * 3600)
    new_unowned = make(tmp_path, f"{TMP_PREFIX}mno")
    other = make(tmp_path, "something-else", age_s=3 * 3600)

    removed = remove_leftovers(tmp_path, max_age_s=3600)

    assert sorted(removed) == sorted([dead, old_unowned])
    assert all(p.exists() for p in (mine, parent, new_unowned, other))
    assert not dead.exists() and not old_unowned.exists()


def test_reused_process_id_does_not_protect_a_folder(tmp_path: Path) -> None:
    """A live process that started after the folder was last changed cannot own it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = make(tmp_path, f"{task_dir_prefix(child.pid)}old", age_s=3600)
        fresh = tmp_path / f"{task_dir_prefix(child.pid)}new"
        time.sleep(0.05)
        fresh.mkdir()
        removed = remove_leftovers(tmp_path, max_age_s=24 * 3600)
    finally:
        child.kill()
        child.wait()
    assert removed == [stale]
    assert fresh.exists()


def test_middleware_cleans_at_worker_boot(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    leftover = make(tmp_path, f"{task_dir_prefix(dead_pid())}x")
    broker = StubBroker(middleware=[TempCleanup(max_age_s=3600)])
    worker = dramatiq.Worker(broker, worker_threads=1)
    worker.start()
    worker.stop()
    assert not leftover.exists()
