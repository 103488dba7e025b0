"""Failure handling without a broker: retry policy, cancel and requeue in the store, idempotent
and cancelable jobs, and what a retried dead letter carries."""

from __future__ import annotations

import tempfile
from pathlib import Path

import dramatiq
import pytest

from pipeline.brokers.deadletters import fresh_copy
from pipeline.config import ConfigError, load_settings
from pipeline.errors import TaskCanceled
from pipeline.jobs import TMP_PREFIX, run_job
from pipeline.routing import Classification, choose_route
from pipeline.store import State, Task, TaskStore, new_task_id
from pipeline.transfer.checksums import FileRef, sha256_file
from pipeline.transfer.local import LocalStore, copy_verified, put_atomically
from pipeline.transfer.manifest import manifest_path, read_manifest


def test_limits_stay_below_the_consumer_timeout() -> None:
    settings = load_settings()
    assert settings.max_retries == 3
    assert settings.max_time_limit_s < settings.broker_consumer_timeout_s
    assert settings.max_backoff_ms / 1000 < settings.broker_consumer_timeout_s
    ten_hours = Classification("transcribe", "audio", "audio/mpeg", 10**9, duration=36_000.0)
    assert choose_route(ten_hours, settings).time_limit_s == settings.max_time_limit_s
    short = Classification("transcribe", "audio", "audio/mpeg", 10**5, duration=30.0)
    assert choose_route(short, settings).time_limit_s < settings.max_time_limit_s

    with pytest.raises(ConfigError) as error:
        load_settings(max_time_limit_s=1800)
    assert "MORAG_MAX_TIME_LIMIT_S: Value error, must stay below RabbitMQ's consumer timeout" in str(
        error.value
    )
    with pytest.raises(ConfigError, match="MORAG_MAX_BACKOFF_MS"):
        load_settings(broker_consumer_timeout_s=600, max_time_limit_s=300, max_backoff_ms=600_000)
    raised = load_settings(broker_consumer_timeout_s=7200, max_time_limit_s=3600)
    assert raised.max_time_limit_s == 3600


@pytest.fixture
def store(tmp_path: Path) -> TaskStore:
    return TaskStore(tmp_path / "tasks.db")


def make(store: TaskStore) -> Task:
    task = Task(new_task_id(), "convert", State.queued, "a.md", {"path": "x"}, {}, {"queue": "cpu"})
    return store.create(task)


def test_canceled_is_final(store: TaskStore) -> None:
    task = make(store)
    assert store.mark_running(task.id, "w1", 1)
    assert store.mark_canceled(task.id, "canceled by the user")
    assert not store.mark_canceled(task.id, "again")
    assert not store.mark_running(task.id, "w2", 2)
    assert not store.mark_done(task.id, [], {}, "w1")
    assert not store.mark_failed(task.id, "late failure", "w1")
    assert not store.requeue(task.id, {"from": "cpu.XQ"})
    canceled = store.get(task.id)
    assert canceled.state == State.canceled
    assert canceled.error == "canceled by the user"
    assert [e["event"] for e in canceled.events] == ["submitted", "started", "canceled"]


def test_requeue_keeps_the_history(store: TaskStore) -> None:
    task = make(store)
    store.mark_running(task.id, "w1", 1)
    store.mark_failed(task.id, "boom", "w1")
    assert store.requeue(task.id, {"from": "cpu.XQ", "reason": "boom"})
    again = store.get(task.id)
    assert again.state == State.queued and again.error is None and again.finished_at is None
    assert [e["event"] for e in again.events] == ["submitted", "started", "failed", "requeued"]
    store.mark_running(task.id, "w2", 1)
    store.mark_done(task.id, [], {}, "w2")
    assert not store.requeue(task.id, {})  # done stays done


@pytest.fixture
def files(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "files")


def markdown_job(files: LocalStore, tmp_path: Path, text: str = "# Title\n\nSome words.\n") -> dict:
    source = tmp_path / "upload.md"
    source.write_text(text)
    task_id = new_task_id()
    ref = files.add_input(task_id, "notes.md", source, sha256_file(source), source.stat().st_size)
    return {
        "task_id": task_id,
        "kind": "convert",
        "filename": "notes.md",
        "input": ref.to_dict(),
        "media": {"format": "md"},
        "options": {},
        "route": {"queue": "cpu", "gpu": "prefer"},
    }


class UncheckedTransport:
    """Files of a local store, with no grant checked: what ``run_job`` does, apart from who may
    reach the files (tests/transfer/test_local_grants.py checks that)."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    def download(self, ref: FileRef, dest: Path) -> Path:
        return copy_verified(self.store.resolve(ref.path), ref, dest)

    def upload(self, src: Path, store_path: str) -> FileRef:
        return put_atomically(src, self.store.resolve(store_path), store_path)

    def authorize(self, task_id: str, grant: str) -> None:
        """Nothing to present: this worker shares the server's disk."""

    def forget(self, task_id: str) -> None:
        """Nothing was presented."""

    def read_small(self, store_path: str, limit: int = 1 << 20) -> bytes | None:
        try:
            with self.store.resolve(store_path).open("rb") as f:
                return f.read(limit)
        except FileNotFoundError:
            return None

    def close(self) -> None:
        pass


class Events:
    def __init__(self) -> None:
        self.stages: list[str] = []

    def progress(self, task_id: str, stage: str, percent: float) -> None:
        self.stages.append(stage)


def test_a_job_whose_outputs_are_complete_is_not_run_again(files: LocalStore, tmp_path: Path) -> None:
    transport = UncheckedTransport(files)
    job = markdown_job(files, tmp_path)
    settings = load_settings(data_dir=tmp_path)
    outputs, result = run_job(job, settings=settings, transport=transport, events=Events())
    assert "reused" not in result
    manifest = read_manifest(transport, job["task_id"])
    assert manifest is not None and manifest.outputs == outputs

    # Without its input the job could not run: it must not try to.
    files.resolve(job["input"]["path"]).unlink()
    events = Events()
    again, result_again = run_job(job, settings=settings, transport=transport, events=events)
    assert again == outputs
    assert result_again == {**result, "reused": True}
    assert events.stages == []

    # A damaged manifest is no manifest: the job would run again.
    files.resolve(manifest_path(job["task_id"])).write_text("{not json")
    assert read_manifest(transport, job["task_id"]) is None


def test_a_canceled_job_stops_and_leaves_nothing(
    files: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    job = markdown_job(files, tmp_path)
    events = Events()
    with pytest.raises(TaskCanceled, match="canceled while converting"):
        run_job(
            job,
            settings=load_settings(data_dir=tmp_path),
            transport=UncheckedTransport(files),
            events=events,
            should_stop=lambda: "converting" in events.stages,
        )
    assert not list(scratch.glob(f"{TMP_PREFIX}*"))
    assert not files.resolve(f"tasks/{job['task_id']}/output").exists()


def test_a_retried_dead_letter_starts_afresh() -> None:
    message = dramatiq.Message(
        queue_name="gpu.XQ",
        actor_name="transcribe",
        args=(),
        kwargs={"job": {"task_id": "t1"}},
        options={
            "broker_priority": 6,
            "time_limit": 120_000,
            "retries": 4,
            "traceback": "Traceback ...",
            "deliveries": 3,
            "dead_letter": {"reason": "boom"},
            "dead_retries": 1,
        },
    )
    copy = fresh_copy(message)
    assert copy.queue_name == "gpu"
    assert copy.message_id == message.message_id
    assert copy.kwargs == message.kwargs
    assert copy.options == {"broker_priority": 6, "time_limit": 120_000, "dead_retries": 2}
