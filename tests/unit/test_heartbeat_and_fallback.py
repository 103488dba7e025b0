"""Heartbeat and GpuFallback middleware in a real Dramatiq worker, over the stub broker.

Each test declares its own actors on a fresh broker built with the pipeline's
whole middleware stack, so nothing is shared with other tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pytest
from dramatiq import Message, Middleware, Worker
from dramatiq.middleware import CurrentMessage

from pipeline.brokers.stub import build_stub_broker
from pipeline.config import Settings
from pipeline.errors import GpuError
from tests.conftest import TEST_SECRET, wait_for


def control_messages(broker) -> list[Message]:
    return [Message.decode(body) for body in list(broker.queues["control"].queue)]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        secret_key=TEST_SECRET,
        file_access="shared",
        heartbeat_interval=0.05,
        max_retries=1,
        min_backoff_ms=10,
        max_backoff_ms=20,
    )


@pytest.fixture
def broker(settings: Settings) -> Iterator[object]:
    broker = build_stub_broker(settings)
    yield broker
    broker.close()


def beats(broker, **match) -> list[dict]:
    found = []
    for message in control_messages(broker):
        if message.actor_name in ("worker_heartbeat", "worker_goodbye"):
            beat = message.kwargs["beat"]
            if all(beat.get(k) == v for k, v in match.items()):
                found.append(beat)
    return found


def test_a_gpu_worker_beats_with_its_task_and_says_goodbye(broker) -> None:
    started, release = threading.Event(), threading.Event()

    @dramatiq.actor(broker=broker, queue_name="gpu", actor_name="hb_slow")
    def slow(job: dict) -> None:
        started.set()
        release.wait(10)

    worker = Worker(broker, queues={"gpu"}, worker_threads=1, worker_timeout=20)
    worker.start()
    try:
        slow.send(job={"task_id": "t1", "kind": "transcribe", "media": {"duration": 10.0}})
        assert started.wait(5)
        [busy, *_] = wait_for(
            "a beat with the task", lambda: beats(broker, current=["t1"]), 10, interval=0.02
        )
        assert busy["capability"] == "gpu" and busy["queues"] == ["gpu"]
        assert busy["hardware"]["cpu_cores"] >= 1 and "gpus" in busy["hardware"]
        assert busy["version"] and busy["host"] and busy["session"]
        release.set()
        [done, *_] = wait_for(
            "a beat counting it done", lambda: beats(broker, done=1, current=[]), 10, interval=0.02
        )
        assert done["failed"] == 0
        assert done["speed"]["samples"] == 1 and done["speed"]["realtime_factor"] > 0
    finally:
        release.set()
        worker.stop()
    messages = control_messages(broker)
    assert messages[-1].actor_name == "worker_goodbye"
    assert messages[-1].kwargs["worker"] == messages[-1].kwargs["beat"]["worker"]
    assert any(m.kwargs["beat"].get("draining") for m in messages if m.actor_name == "worker_heartbeat")


class Sent(Middleware):
    """Records every message published through the broker."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def after_enqueue(self, broker, message: Message, delay) -> None:  # type: ignore[no-untyped-def]
        self.messages.append(message)


def test_the_servers_control_consumer_sends_no_heartbeat(broker, settings: Settings) -> None:
    sent = Sent()
    broker.add_middleware(sent)
    handled: list[float] = []

    @dramatiq.actor(broker=broker, queue_name="control", actor_name="hb_probe")
    def probe() -> None:
        handled.append(time.monotonic())

    worker = Worker(broker, queues={"control"}, worker_threads=1, worker_timeout=20)
    worker.start()
    booted = time.monotonic()
    try:
        # The consumer at work five heartbeat intervals after boot: a beat had its chances.
        def handled_late() -> bool:
            if handled and handled[-1] >= booted + 5 * settings.heartbeat_interval:
                return True
            probe.send()
            return False

        wait_for("a probe handled five heartbeat intervals after boot", handled_late, 10, interval=0.02)
    finally:
        worker.stop()  # a worker that beats says draining and goodbye here
    assert [m.actor_name for m in sent.messages if m.actor_name != "hb_probe"] == []


def _flaky_gpu_actor(broker, calls: list[str], name: str):
    @dramatiq.actor(broker=broker, queue_name="gpu", actor_name=name, gpu_fallback=True, max_retries=1)
    def transcribe_like(job: dict) -> None:
        queue = CurrentMessage.get_current_message().queue_name
        calls.append(queue)
        if queue.startswith("gpu"):
            raise GpuError("cannot load tiny.en on the GPU: CUDA failed with error no CUDA-capable device")

    return transcribe_like


def test_a_gpu_failure_moves_the_task_to_cpu_without_retry_or_failure(broker) -> None:
    calls: list[str] = []
    actor = _flaky_gpu_actor(broker, calls, "fallback_prefer")
    worker = Worker(broker, queues={"gpu", "cpu"}, worker_threads=1, worker_timeout=20)
    worker.start()
    try:
        job = {"task_id": "t2", "route": {"queue": "gpu", "gpu": "prefer"}}
        actor.send(job=job)
        broker.join("gpu")
        wait_for("gpu then cpu", lambda: calls == ["gpu", "cpu"], 10, interval=0.02)
        broker.join("cpu")
        wait_for(
            "a beat counting it handed on",
            lambda: beats(broker, skipped=1, done=1, failed=0),
            10,
            interval=0.02,
        )  # the GPU attempt: handed on, not failed
    finally:
        worker.stop()
    events = {m.actor_name: m.kwargs for m in control_messages(broker)}
    assert "task_retrying" not in events and "task_failed" not in events
    rerouted = events["task_rerouted"]
    assert (rerouted["task_id"], rerouted["source"], rerouted["target"]) == ("t2", "gpu", "cpu")
    assert "no CUDA-capable device" in rerouted["reason"]
    assert broker.dead_letters == []
    assert len(broker.queues["gpu.DQ"].queue) == 0


def test_a_task_that_requires_the_gpu_is_retried_there_and_fails(broker) -> None:
    calls: list[str] = []
    actor = _flaky_gpu_actor(broker, calls, "fallback_require")
    worker = Worker(broker, queues={"gpu", "cpu"}, worker_threads=1, worker_timeout=20)
    worker.start()
    try:
        actor.send(job={"task_id": "t3", "route": {"queue": "gpu", "gpu": "require"}})
        wait_for(
            "a task_failed report",
            lambda: any(m.actor_name == "task_failed" for m in control_messages(broker)),
            10,
            interval=0.02,
        )
    finally:
        worker.stop()
    assert calls == ["gpu", "gpu"]
    names = [m.actor_name for m in control_messages(broker)]
    assert "task_rerouted" not in names and "task_retrying" in names
