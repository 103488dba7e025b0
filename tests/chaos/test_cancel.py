"""Cancellation of a queued and of a running task, on real workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.conftest import events, submit, task, wait_consumers, wait_for
from tests.conftest import Stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def test_cancel_running_and_queued(stack: Stack, lasting_audio: Path, samples: Path, tmp_path: Path) -> None:
    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()
    stack.start_server()
    # On the CPU also where a GPU is: the transcription must last while it is canceled.
    stack.start_worker("gpu", TMPDIR=str(worker_tmp), MORAG_WHISPER_DEVICE="cpu")
    wait_consumers(stack, "gpu")

    running = submit(stack, lasting_audio)["id"]
    queued = submit(stack, samples / "speech.mp3")["id"]

    def transcribing() -> dict | None:
        t = task(stack, running)
        return t if t["progress"].get("stage") == "transcribing" and t["progress"]["percent"] > 0 else None

    wait_for("the transcription to be under way", transcribing, stack=stack)
    assert any(worker_tmp.glob("morag-task-*")), "the running task has its temp folder"
    assert task(stack, queued)["state"] == "queued"  # one GPU worker, one message at a time

    proc = stack.cli("cancel", queued)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"task {queued} canceled"
    proc = stack.cli("cancel", running)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"task {running} canceled; its worker gpu-worker stops it"

    stopped = wait_for(
        "the worker to stop the transcription", lambda: events(t := task(stack, running), "stopped") and t
    )
    assert stopped["state"] == "canceled"
    assert stopped["events"][-1]["detail"]["reason"] == "canceled while transcribing"
    skipped = wait_for(
        "the worker to skip the queued task", lambda: events(t := task(stack, queued), "skipped") and t
    )
    assert skipped["state"] == "canceled"
    assert not events(skipped, "started")

    # Nothing left behind: no temp folder on the worker, no outputs in the store.
    assert not list(worker_tmp.glob("morag-task-*"))
    assert not (stack.data_dir / "files" / "tasks" / running / "output").exists()

    # Canceled is final; the worker goes on with the next task.
    proc = stack.cli("cancel", running)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"morag-pipeline: task {running} is canceled: nothing to cancel"
    after = submit(stack, samples / "speech.mp3")["id"]
    assert wait_for("the next task", lambda: (t := task(stack, after))["state"] == "done" and t)
    assert task(stack, running)["state"] == "canceled"
