"""The chunks of a long recording on the server's side (Dramatiq's stub broker): each a task of its
own, published at once; the task's progress is theirs summed; a lost chunk is delivered again
alone; a failed chunk fails the task and cancels the others. The whole run is in
tests/integration/test_long_media.py."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from pipeline import chunks, control
from pipeline.config import Settings
from pipeline.errors import UnsupportedSchema
from pipeline.fleet.reconciler import Reconciler
from pipeline.fleet.registry import Registry
from pipeline.kinds import SPLIT, TRANSCRIBE
from pipeline.routing import Capacity, QueueLoad
from pipeline.services import Services, build_services
from pipeline.store import State, Task
from pipeline.submission import SubmitOptions, record
from pipeline.task_message import build_job, check_job
from tests.conftest import looped_speech

SLICES = [[0.0, 20.0], [20.0, 40.0], [40.0, 55.0]]
RECORDED: dict[str, Task] = {}


@pytest.fixture
def services(tmp_path: Path) -> Services:
    settings = Settings(
        data_dir=tmp_path / "data", secret_key="s" * 48, file_access="shared", task_lost_after_s=60,
        publish_wait_s=0, split_over_s=20, split_chunk_s=10,
    )  # fmt: skip
    return build_services(settings)


@pytest.fixture
def broker(stub_broker):  # type: ignore[no-untyped-def]
    stub_broker.flush_all()
    yield stub_broker
    stub_broker.flush_all()


def _published(broker) -> int:  # type: ignore[no-untyped-def]
    """Messages waiting on the task queues (a chunk is routed as any transcription)."""
    return sum(broker.queues[name].qsize() for name in ("gpu", "cpu"))


def _cut(services: Services, broker, tmp_path: Path) -> Task:  # type: ignore[no-untyped-def]
    """A recording of about 55 s, recorded as submit records it, and its cutting stage done (the
    record as it was before is in ``RECORDED``)."""
    upload = looped_speech(tmp_path / "long.mp3", 5)
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    task = record(services, upload, "long.mp3", digest, upload.stat().st_size, SubmitOptions(), lambda: 0)
    assert task.kind == SPLIT.name and task.route["queue"] == "cpu"
    assert task.input["media"]["chunk_s"] == 10
    assert chunks.fan_out(services, broker, task, {"chunks": SLICES}, "cpu-a")
    RECORDED[task.id] = task
    return services.store.get(task.id)


def test_each_chunk_is_a_task_of_its_own_published_at_once(
    services: Services,
    broker,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    task = _cut(services, broker, tmp_path)
    assert task.kind == TRANSCRIBE.name and task.state is State.running
    ids = [c["id"] for c in chunks.chunks_of(task)]
    assert ids == [f"{task.id}-000", f"{task.id}-001", f"{task.id}-002"]
    records = services.store.records(ids)
    for n, chunk_id in enumerate(ids):
        chunk = records[chunk_id]
        assert chunk.kind == TRANSCRIBE.name and chunk.published_at is not None
        assert chunk.input["media"]["slice"] == SLICES[n] and chunk.input["parent"] == task.id
        # Its own link to the recording, under its own task: its grant opens it alone.
        assert chunk.input["path"].startswith(f"tasks/{chunk_id}/input/")
        assert services.files.resolve_plain(chunk.input["path"]).read_bytes() == (
            services.files.resolve_plain(task.input["path"]).read_bytes()
        )
    assert _published(broker) == 3
    # The cutting stage's completion, retried, records and publishes no chunk twice.
    chunks.fan_out(services, broker, RECORDED[task.id], {"chunks": SLICES}, "cpu-a")
    assert _published(broker) == 3
    # Listings show the task, not its chunks.
    assert [t.id for t in services.store.list()] == [task.id]
    assert len(services.store.list(chunks=True)) == 4


def test_the_progress_of_a_task_is_its_chunks_summed(
    services: Services,
    broker,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    task = _cut(services, broker, tmp_path)
    store = services.store
    first, second, _ = (c["id"] for c in chunks.chunks_of(task))
    store.mark_running(first, "cpu-a", 1)
    store.mark_running(second, "cpu-b", 1)
    store.set_progress(first, {"stage": "transcribing", "percent": 50.0})
    chunks.chunk_progress(services, store.get(first))
    shown = store.get(task.id).progress
    assert shown["percent"] == round(20 * 50 / 55, 1)
    assert shown["stage"] == "transcribing: 0 of 3 chunks done, 2 running"
    store.mark_done(second, [], {}, "cpu-b")
    chunks.chunk_progress(services, store.get(first))
    assert store.get(task.id).progress["percent"] == round((20 * 50 + 20 * 100) / 55, 1)


def test_a_lost_chunk_is_delivered_again_alone(
    services: Services,
    broker,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    task = _cut(services, broker, tmp_path)
    broker.flush_all()
    first = chunks.chunks_of(task)[0]["id"]
    services.store.mark_running(first, "killed-worker", 1)
    reconciler = Reconciler(services, Registry.from_settings(services.settings), broker)
    report = reconciler.run(now=time.time() + 61)
    # The task waits on its chunks, silent as it is: only the chunk is sent again.
    assert report.redelivered == [first]
    assert _published(broker) == 1
    assert services.store.get(task.id).state is State.running


def test_a_failed_chunk_fails_its_task_and_cancels_the_others(
    services: Services,
    broker,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    task = _cut(services, broker, tmp_path)
    store = services.store
    first, second, third = (c["id"] for c in chunks.chunks_of(task))
    store.mark_done(first, [], {}, "cpu-a")
    told = []
    assert store.mark_failed(second, "cannot decode audio: broken frames", "cpu-b")
    chunks.chunk_ended(services, store.get(second), lambda chunk_id, why: told.append(chunk_id))
    failed = store.get(task.id)
    assert failed.state is State.failed
    assert failed.error == "chunk 1 (20.0-40.0s) failed: cannot decode audio: broken frames"
    assert store.get(third).state is State.canceled and told == [third]
    assert store.get(first).state is State.done


def test_a_chunk_job_is_in_schema_3_which_an_older_worker_refuses(
    services: Services,
    broker,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    task = _cut(services, broker, tmp_path)
    chunk = services.store.get(chunks.chunks_of(task)[1]["id"])
    job = build_job(chunk)
    assert job["schema"] == 3 and job["media"]["slice"] == [20.0, 40.0]
    check_job(job)  # this release reads it
    # A worker that reads schema 2 at most would transcribe the whole recording: it refuses.
    with pytest.raises(UnsupportedSchema, match=r"schema 3, newer than this release reads \(2\)"):
        control.check_schema(job["schema"], "the task message", 2, 1, "this worker")
    assert build_job(RECORDED[task.id])["schema"] == 1  # the cutting stage's job: any worker reads it


def test_chunks_go_to_cpu_workers_too_once_the_gpu_queue_is_the_slower(
    services: Services,
    broker,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    # One GPU worker, one CPU worker, both idle: a chunk of 20 s takes about 2.4 s on the GPU
    # and 6 s on the CPU, so the third chunk is done sooner on the CPU than behind two on the GPU.
    services.capacity = lambda: Capacity(gpu_workers=1, gpu=QueueLoad(1), cpu=QueueLoad(1))
    task = _cut(services, broker, tmp_path)
    records = services.store.records(c["id"] for c in chunks.chunks_of(task))
    assert [records[c["id"]].route["queue"] for c in chunks.chunks_of(task)] == ["gpu", "gpu", "cpu"]
    assert "GPU queue busy" in records[chunks.chunks_of(task)[2]["id"]].route["reasons"][0]
    assert broker.queues["gpu"].qsize() == 2 and broker.queues["cpu"].qsize() == 1
