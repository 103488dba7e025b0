"""The warm-up of a GPU-queue worker (WhisperWarmup, whisper.warm): a model that cannot be loaded
(here: CUDA asked on a machine without a GPU) is logged and never stops the worker, and the slot
it held is given back; a worker that does not consume ``gpu`` loads nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import dramatiq
import pytest
from dramatiq import Worker

from pipeline.brokers.stub import build_stub_broker
from pipeline.config import Settings
from pipeline.middleware.whisper_warmup import WhisperWarmup
from pipeline.processors import slots, whisper
from tests.conftest import TEST_SECRET


def settings(tmp_path: Path, **values: object) -> Settings:
    values = {"whisper_warmup": True, **values}
    return Settings(data_dir=tmp_path, secret_key=TEST_SECRET, file_access="shared", heartbeat_interval=0,
                    **values)  # fmt: skip


def warmup_of(broker) -> WhisperWarmup:  # type: ignore[no-untyped-def]
    [found] = [m for m in broker.middleware if isinstance(m, WhisperWarmup)]
    return found


def test_a_warm_up_that_fails_is_logged_and_the_worker_runs_its_tasks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whisper.drop_models()
    broker = build_stub_broker(settings(tmp_path, whisper_device="cuda", whisper_model="/no/such/model"))
    ran = threading.Event()

    @dramatiq.actor(broker=broker, queue_name="gpu", actor_name="after_failed_warmup")
    def task() -> None:
        with slots.slots.held():  # the slot the warm-up held is free again
            ran.set()

    worker = Worker(broker, queues={"gpu"}, worker_threads=2, worker_timeout=20)
    with caplog.at_level("INFO"):
        worker.start()
        try:
            warmup_of(broker).thread.join(30)  # type: ignore[union-attr]
            task.send()
            assert ran.wait(10)
        finally:
            worker.stop()
            broker.close()
    [failed] = [
        r
        for r in caplog.records
        if r.getMessage() == "whisper warm-up failed: the first task loads the model"
    ]
    assert failed.levelname == "ERROR" and "/no/such/model" in failed.error  # type: ignore[attr-defined]
    assert slots.slots.in_use == 0 and whisper.loaded_models() == []


def test_warm_loads_the_model_once_and_transcribes_a_second_of_silence() -> None:
    whisper.drop_models()
    done = whisper.warm("tiny.en", "cpu")
    assert (done["model"], done["device"], done["compute_type"]) == ("tiny.en", "cpu", "int8")
    assert done["load_s"] > 0 and done["transcribe_s"] > 0
    assert whisper.loaded_models() == ["tiny.en@cpu"]
    assert whisper.warm("tiny.en", "cpu")["load_s"] < 0.05  # already loaded: not loaded again
    whisper.drop_models()


def test_a_worker_without_the_gpu_queue_loads_nothing(tmp_path: Path) -> None:
    broker = build_stub_broker(settings(tmp_path))
    worker = Worker(broker, queues={"cpu"}, worker_threads=1, worker_timeout=20)
    worker.start()
    try:
        assert warmup_of(broker).thread is None
    finally:
        worker.stop()
        broker.close()
