"""A worker with its own empty data directory runs a job through SFTP alone, and the server accepts
its outputs; a corrupt input is never processed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.errors import ChecksumMismatch
from pipeline.jobs import run_job
from pipeline.transfer.checksums import FileRef, sha256_file
from pipeline.transfer.local import LocalStore
from pipeline.transfer.sftp_server import SftpServer
from pipeline.transfer.transport import open_transport
from tests.conftest import SPOKEN_WORDS
from tests.transfer.conftest import worker_settings

SAMPLES = Path(__file__).resolve().parent.parent.parent / "samples"


class Events:
    """Collects a job's progress reports, as the control queue would receive them."""

    def __init__(self) -> None:
        self.stages: list[str] = []

    def progress(self, task_id: str, stage: str, percent: float) -> None:
        if not self.stages or self.stages[-1] != stage:
            self.stages.append(stage)


def transcribe_job(task_id: str, ref: FileRef) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "kind": "transcribe",
        "filename": "speech.mp3",
        "input": ref.to_dict(),
        "media": {"format": "mp3", "duration": 3.0},
        "options": {},
        "route": {"queue": "gpu", "gpu": True},
    }


def store_input(store: LocalStore, task_id: str, sample: Path) -> FileRef:
    """Put a file in the store as the API does on submit."""
    staged = store.root.parent / sample.name
    shutil.copy(sample, staged)
    return store.add_input(task_id, sample.name, staged, sha256_file(staged), staged.stat().st_size)


@pytest.fixture
def worker(tmp_path: Path, server: SftpServer) -> Settings:
    settings = worker_settings(tmp_path, server.port, sftp_host_key=server.fingerprint)
    assert list(settings.data_dir.iterdir()) == []  # nothing shared with the server
    return settings


def test_worker_runs_a_job_over_sftp(worker: Settings, store: LocalStore) -> None:
    ref = store_input(store, "e2e1", SAMPLES / "speech.mp3")
    events = Events()
    transport = open_transport(worker)
    try:
        outputs, summary = run_job(
            transcribe_job("e2e1", ref), settings=worker, transport=transport, events=events
        )
    finally:
        transport.close()
    assert events.stages[0] == "downloading" and "uploading" in events.stages
    assert {o["format"] for o in outputs} >= {"json", "srt", "vtt", "txt"}
    for output in outputs:
        store.check(FileRef.from_dict(output))  # what the control actor does before marking the task done
    text = next(o for o in outputs if o["format"] == "txt")
    transcript = store.resolve(text["path"]).read_text().lower()
    assert all(word in transcript for word in SPOKEN_WORDS), transcript
    assert summary["segments"] >= 1
    assert list(worker.data_dir.iterdir()) == []


def test_corrupt_input_is_never_processed(worker: Settings, store: LocalStore) -> None:
    ref = store_input(store, "e2e2", SAMPLES / "speech.mp3")
    stored = store.resolve(ref.path)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    events = Events()
    transport = open_transport(worker)
    try:
        with pytest.raises(ChecksumMismatch, match="after 4 attempts"):
            run_job(transcribe_job("e2e2", ref), settings=worker, transport=transport, events=events)
    finally:
        transport.close()
    assert events.stages == ["downloading"]  # no extraction, no transcription, no upload
    assert not store.resolve("tasks/e2e2/output").exists()
