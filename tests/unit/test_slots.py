"""Transcription slots: how many a process runs at once (decided from VRAM or set), the prefetch
that goes with them, and one fewer after a CUDA out-of-memory error (pipeline.processors.slots,
WorkerSizing, GpuFallback)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import dramatiq
import pytest
from dramatiq import Message, Worker
from dramatiq.middleware import CurrentMessage

from pipeline.brokers.stub import build_stub_broker
from pipeline.config import Settings
from pipeline.errors import GpuError
from pipeline.middleware.time_limit import SlotAwareTimeLimit
from pipeline.middleware.worker_sizing import WorkerSizing
from pipeline.processors import slots as slots_module
from pipeline.processors.slots import Slots, decide, model_vram_mb
from tests.conftest import TEST_SECRET, wait_for

GIB = 1024


@pytest.mark.parametrize(
    ("model", "mb"),
    [
        ("tiny.en", 1024),
        ("base", 1024),
        ("small.en", 2048),
        ("medium", 3584),
        ("large-v3", 4608),
        ("Systran/faster-whisper-large-v3", 4608),
        ("distil-large-v3", 4608),
        ("large-v3-turbo", 3072),
        ("/models/my-fine-tune", 4608),  # unknown: counted as a large one
    ],
)
def test_each_model_has_a_vram_estimate(model: str, mb: int) -> None:
    assert model_vram_mb(model) == mb


def test_on_cuda_the_free_vram_decides_the_slots() -> None:
    # 24 GiB free: 10% (2457 MiB) kept, 22119 MiB left, 4 x 4608 for large-v3.
    assert decide(configured=0, device="cuda", threads=8, model="large-v3", free_vram_mb=24 * GIB).slots == 4
    # 3 GiB free: 1 GiB kept, two tiny models fit.
    assert decide(configured=0, device="cuda", threads=8, model="tiny.en", free_vram_mb=3 * GIB).slots == 2
    # 80 GiB free would hold 15 large models, but one thread must stay free to prepare the next task.
    many = decide(configured=0, device="cuda", threads=5, model="large-v3", free_vram_mb=80 * GIB)
    assert many.slots == 4 and "threads - 1" in many.reason
    # Too little for even one: still one (an out-of-memory error then moves the task to cpu).
    assert decide(configured=0, device="cuda", threads=4, model="large-v3", free_vram_mb=2 * GIB).slots == 1
    unknown = decide(configured=0, device="cuda", threads=4, model="large-v3", free_vram_mb=None)
    assert unknown.slots == 1 and "unknown" in unknown.reason


def test_on_cpu_one_slot_and_a_setting_wins() -> None:
    assert decide(configured=0, device="cpu", threads=8, model="tiny.en", free_vram_mb=None).slots == 1
    assert decide(configured=3, device="cpu", threads=8, model="tiny.en").slots == 3
    assert decide(configured=3, device="cuda", threads=2, model="tiny.en", free_vram_mb=80 * GIB).slots == 1
    assert decide(configured=0, device="cuda", threads=1, model="tiny.en", free_vram_mb=80 * GIB).slots == 1


def worker(queues: set[str], threads: int) -> SimpleNamespace:
    return SimpleNamespace(consumer_whitelist=queues, worker_threads=threads, queue_prefetch=None)


def test_a_gpu_worker_takes_one_message_more_than_its_slots(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, whisper_device="cuda", whisper_model="tiny.en")
    sizing = WorkerSizing(settings, gpus=[{"index": 0, "vram_total_mb": 8 * GIB, "vram_free_mb": 3 * GIB}])
    try:
        w = worker({"gpu"}, threads=4)
        sizing.before_worker_boot(None, w)  # type: ignore[arg-type]
        assert slots_module.slots.size == 2 and w.queue_prefetch == 3
        cpu = worker({"cpu"}, threads=4)
        sizing.before_worker_boot(None, cpu)  # type: ignore[arg-type]
        assert cpu.queue_prefetch == 4  # one per thread, as before
        assert slots_module.slots.size == 4  # and each thread transcribes its own task
    finally:
        slots_module.slots.resize(1)


def test_a_gpu_worker_with_one_thread_says_it_cannot_prepare_the_next_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sizing = WorkerSizing(Settings(data_dir=tmp_path, whisper_device="cpu"))
    w = worker({"gpu"}, threads=1)
    with caplog.at_level("WARNING"):
        sizing.before_worker_boot(None, w)  # type: ignore[arg-type]
    assert w.queue_prefetch == 1 and slots_module.slots.size == 1
    assert any("--threads 2" in record.getMessage() for record in caplog.records)


def test_slots_hold_at_most_their_size_at_once() -> None:
    held = Slots(2)
    running, most = [0], [0]
    lock = threading.Lock()

    def work() -> None:
        with held.held():
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert most[0] == 2 and held.in_use == 0


def test_a_wait_for_a_slot_ends_without_one_when_its_task_is_canceled() -> None:
    held = Slots(1)
    held.take()  # the transcription ahead of it
    canceled, waited = threading.Event(), []
    outcome: list[bool] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(
            held.take(canceled.is_set, on_wait=lambda: waited.append(True), poll_s=0.02)
        )
    )
    waiter.start()
    time.sleep(0.1)
    assert outcome == [] and waited == [True]  # it waits, and said so once
    canceled.set()
    waiter.join(5)
    assert outcome == [False] and held.in_use == 1  # it gave up and took nothing
    held.give()
    assert held.take(canceled.is_set) is True  # a free slot is taken whatever should_stop says


def test_out_of_memory_lowers_the_slots_once_per_size_never_below_one() -> None:
    held = Slots(3)
    inside, release = threading.Barrier(3), threading.Event()
    outcomes: list[bool] = []

    def out_of_memory() -> None:  # three transcriptions run out of memory together
        with held.held():
            inside.wait(5)
            release.wait(5)
            outcomes.append(held.out_of_memory())

    threads = [threading.Thread(target=out_of_memory) for _ in range(3)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(10)
    assert outcomes == [True, True, True]  # each is tried again ...
    assert held.size == 2  # ... with one slot fewer, not three fewer
    with held.held():
        assert held.out_of_memory() and held.size == 1
    with held.held():
        assert not held.out_of_memory() and held.size == 1  # at one: nothing to lower, the task moves


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[object]:
    settings = Settings(
        data_dir=tmp_path,
        secret_key=TEST_SECRET,
        file_access="shared",
        heartbeat_interval=0,
        whisper_warmup=False,
        whisper_concurrency=2,
        max_retries=2,
        min_backoff_ms=10,
        max_backoff_ms=20,
    )
    broker = build_stub_broker(settings)
    yield broker
    broker.close()
    slots_module.slots.resize(1)


def control(broker) -> list[str]:  # type: ignore[no-untyped-def]
    return [Message.decode(body).actor_name for body in list(broker.queues["control"].queue)]


def test_an_out_of_memory_error_is_retried_on_gpu_with_one_slot_fewer_then_moved_at_one(broker) -> None:
    calls: list[tuple[str, int]] = []

    @dramatiq.actor(broker=broker, queue_name="gpu", actor_name="oom_twice", gpu_fallback=True)
    def transcribe_like(job: dict) -> None:
        queue = CurrentMessage.get_current_message().queue_name
        with slots_module.slots.held():
            calls.append((queue, slots_module.slots.size))
            if queue == "gpu":
                raise GpuError("transcription failed on the GPU: CUDA failed with error out of memory")

    # A CPU worker, then a GPU worker (the process's slots are the last booted's: the GPU one's).
    sizes = (("cpu", 1), ("gpu", 3))
    workers = [Worker(broker, queues={queue}, worker_threads=n, worker_timeout=20) for queue, n in sizes]
    for w in workers:
        w.start()
    try:
        assert slots_module.slots.size == 2
        transcribe_like.send(job={"task_id": "t-oom", "route": {"queue": "gpu", "gpu": "prefer"}})
        wait_for("the task on cpu", lambda: calls and calls[-1][0] == "cpu", 10, interval=0.02)
    finally:
        for w in workers:
            w.stop()
    # At two slots: tried again on gpu with one; at one: moved to cpu, where it ran.
    assert calls == [("gpu", 2), ("gpu", 1), ("cpu", 1)]
    names = control(broker)
    assert names.count("task_retrying") == 1 and names.count("task_rerouted") == 1
    assert "task_failed" not in names


def test_a_task_waiting_for_a_slot_keeps_its_time_limit_for_its_own_work() -> None:
    """The prepared task of a GPU worker waits for the model longer than its own time limit: the
    limit's clock stops while it waits (``SlotAwareTimeLimit``), and it gets the rest of its time
    once it has the slot; Dramatiq's monitor, running, raises nothing meanwhile."""
    limit = SlotAwareTimeLimit(time_limit=60_000, interval=50)
    limit.manager.start()
    waiting = Slots(1)
    waiting.waiting = limit.paused
    waiting.take()  # the task before it holds the model
    seen: dict[str, object] = {}

    def prepared_task() -> None:
        try:
            limit.manager.add_timeout(threading.get_ident(), 500)  # its own limit: 0.5 s
            waiting.take()
            seen["left_s"] = limit.manager.deadlines[threading.get_ident()] - time.monotonic()
            waiting.give()
            limit.manager.remove_timeout(threading.get_ident())  # its task ends, as Dramatiq's would
        except BaseException as exc:  # TimeLimitExceeded, raised in this thread by the monitor
            seen["error"] = exc

    thread = threading.Thread(target=prepared_task)
    thread.start()
    time.sleep(1.0)  # twice its limit, waiting for the slot
    assert limit.manager.deadlines[thread.ident] is None  # its clock is stopped while it waits
    waiting.give()
    thread.join(5)
    assert "error" not in seen, seen
    assert 0.3 < seen["left_s"] <= 0.5  # its own half second, less the instant it took
