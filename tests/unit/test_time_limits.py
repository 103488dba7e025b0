"""Long media fits its time limits by construction: at submit, in the GPU fallback and in the sweep.

A task is placed on a queue only when MORAG_MAX_TIME_LIMIT_S gives it twice
its estimate there; its time limit is the one of the queue it is on, also
after a move. A recording too long for a CPU worker never goes to ``cpu``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pika
import pytest

from pipeline.brokers.limits import check_consumer_timeout
from pipeline.brokers.move import Action
from pipeline.brokers.stub import build_stub_broker
from pipeline.config import Settings
from pipeline.errors import BadInput, GpuError
from pipeline.fleet.sweep import _Decider
from pipeline.middleware.gpu_fallback import GpuFallback
from pipeline.routing import Capacity, Classification, QueueLoad, choose_route, estimate, fit, fit_job

SETTINGS = Settings()
THREE_HOURS = 3 * 3600.0


def recording(seconds: float) -> Classification:
    return Classification("transcribe", "audio", "audio/mpeg", 10**8, duration=seconds)


def job(seconds: float, *, queue: str = "gpu", gpu: str = "prefer", task_id: str = "t1") -> dict[str, Any]:
    """A task message's job as task_message.build_job writes it."""
    return {
        "task_id": task_id,
        "kind": "transcribe",
        "filename": "talk.mp3",
        "input": {"path": f"tasks/{task_id}/input/talk.mp3", "sha256": "0" * 64, "size": 10**8},
        "media": recording(seconds).to_dict(),
        "options": {},
        "route": {"queue": queue, "gpu": gpu},
    }


def message(body: dict[str, Any], queue: str = "gpu", time_limit_ms: int = 120_000) -> dramatiq.Message:
    return dramatiq.Message(
        queue_name=queue,
        actor_name="transcribe",
        args=(),
        kwargs={"job": body},
        options={"time_limit": time_limit_ms, "broker_priority": 3},
    )


# At submit.


def test_a_three_hour_recordings_cpu_limit_never_exceeds_the_cap() -> None:
    on_cpu = fit(estimate(recording(THREE_HOURS), SETTINGS), "cpu", SETTINGS)
    assert on_cpu.time_limit_s <= SETTINGS.max_time_limit_s
    assert not on_cpu.ok and "on a CPU worker, more than half of MORAG_MAX_TIME_LIMIT_S=1500s" in str(
        on_cpu.refused
    )


@pytest.mark.parametrize(
    "capacity",
    [
        Capacity(gpu_workers=None),
        Capacity(gpu_workers=0),
        Capacity(gpu_workers=2),
        # A busy GPU queue and idle CPU workers: by load alone it would go to cpu.
        Capacity(
            gpu_workers=1,
            gpu=QueueLoad(workers=1, waiting=200, task_s=600.0),
            cpu=QueueLoad(workers=8, waiting=0, realtime_factor=0.01),
        ),
    ],
)
def test_a_three_hour_recording_is_never_placed_on_cpu(capacity: Capacity) -> None:
    route = choose_route(recording(THREE_HOURS), SETTINGS, capacity=capacity)
    assert route.queue == "gpu" and route.fallback is None
    assert route.time_limit_s <= SETTINGS.max_time_limit_s
    assert route.time_limit_s >= 2 * route.estimates["gpu_s"]


def test_with_no_gpu_worker_it_waits_on_gpu_and_says_so() -> None:
    route = choose_route(recording(THREE_HOURS), SETTINGS, gpu_workers=0)
    assert route.queue == "gpu"
    assert route.reasons[0].startswith(
        "no GPU worker is connected, and the task is too long for a CPU worker (it takes about 2701s"
    )
    assert route.reasons[0].endswith("it waits for a GPU worker, at most MORAG_GPU_MAX_WAIT=3600s")


def test_gpu_never_refuses_it_at_submit_with_the_fix() -> None:
    with pytest.raises(BadInput, match=r"too long to process: it takes about 2701s on a CPU worker") as error:
        choose_route(recording(THREE_HOURS), SETTINGS, gpu="never")
    assert "let a GPU worker run it (--gpu prefer), split it, or raise MORAG_MAX_TIME_LIMIT_S" in str(
        error.value
    )


@pytest.mark.parametrize("gpu", ["prefer", "require"])
def test_a_recording_too_long_even_for_a_gpu_is_refused(gpu: str) -> None:
    eleven_hours = recording(11 * 3600.0)
    with pytest.raises(BadInput, match=r"too long to process: it takes about \d+s on a GPU worker"):
        choose_route(eleven_hours, SETTINGS, gpu=gpu, gpu_workers=3)


def test_a_document_too_long_for_a_cpu_worker_is_refused() -> None:
    pdf = Classification("convert", "pdf", "application/pdf", 10**7, pages=900)
    with pytest.raises(BadInput, match=r"on a CPU worker.*; split it into smaller documents"):
        choose_route(pdf, SETTINGS)
    assert choose_route(Classification("convert", "pdf", "application/pdf", 10**5, pages=40), SETTINGS)


@pytest.mark.parametrize("seconds", [5.0, 60.0, 600.0, 1800.0, 2900.0, 7200.0, THREE_HOURS, 10 * 3600.0])
@pytest.mark.parametrize("gpu_workers", [0, 1])
def test_every_placed_task_has_twice_its_estimate_and_never_more_than_the_cap(
    seconds: float, gpu_workers: int
) -> None:
    route = choose_route(recording(seconds), SETTINGS, gpu_workers=gpu_workers)
    assert 2 * route.estimates[f"{route.queue}_s"] <= route.time_limit_s <= SETTINGS.max_time_limit_s


def test_a_raised_cap_lets_a_long_recording_run_on_cpu() -> None:
    raised = Settings(broker_consumer_timeout_s=4 * 3600, max_time_limit_s=3 * 3600)
    route = choose_route(recording(THREE_HOURS), raised, gpu_workers=0)
    assert route.queue == "cpu" and route.time_limit_s == raised.max_time_limit_s


# In the GPU fallback (a worker's GPU fails the task).


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Any]:
    broker = build_stub_broker(Settings(data_dir=tmp_path, file_access="shared"))
    yield broker
    broker.close()


def test_the_gpu_fallback_never_moves_a_three_hour_recording_to_cpu(stub: Any) -> None:
    original = message(job(THREE_HOURS))
    assert not GpuFallback(SETTINGS).hand_over(stub, original, GpuError("CUDA out of memory"))
    assert len(stub.queues["cpu"].queue) == 0
    assert "not moved to cpu: too long for a CPU worker" in str(GpuFallback(SETTINGS).stays_on_gpu(original))


def test_the_gpu_fallback_gives_the_copy_the_cpu_time_limit(stub: Any) -> None:
    twenty_minutes = job(1200.0)
    assert GpuFallback(SETTINGS).hand_over(stub, message(twenty_minutes), GpuError("CUDA out of memory"))
    [body] = list(stub.queues["cpu"].queue)
    copy = dramatiq.Message.decode(body)
    limit = fit_job(twenty_minutes, "cpu", SETTINGS).time_limit_s
    assert copy.options["time_limit"] == limit * 1000 != 120_000
    assert limit >= 2 * estimate(recording(1200.0), SETTINGS)["cpu_s"]
    assert copy.kwargs["job"]["route"]["queue"] == "cpu"


def test_a_gpu_failure_of_a_long_recording_is_retried_on_gpu_and_says_why(stub: Any) -> None:
    calls: list[str] = []
    failed = []

    @dramatiq.actor(
        broker=stub, queue_name="gpu", actor_name="long_gpu_task", gpu_fallback=True, max_retries=0
    )
    def long_gpu_task(job: dict) -> None:
        calls.append("run")
        raise GpuError("CUDA out of memory")

    stub.add_middleware(_Recorder(failed))
    worker = dramatiq.Worker(stub, queues={"gpu", "cpu"}, worker_threads=1, worker_timeout=20)
    worker.start()
    try:
        long_gpu_task.send(job=job(THREE_HOURS))
        stub.join("gpu", fail_fast=False)
        worker.join()
    finally:
        worker.stop()
    assert calls == ["run"] and len(stub.queues["cpu"].queue) == 0
    assert len(failed) == 1 and "not moved to cpu: too long for a CPU worker" in failed[0]


class _Recorder(dramatiq.Middleware):
    """Collects the exceptions of failed messages."""

    def __init__(self, into: list[str]) -> None:
        self.into = into

    def after_process_message(self, broker, message, *, result=None, exception=None):  # type: ignore[no-untyped-def]
        if exception is not None:
            self.into.append(str(exception))


# In the sweep (no live worker on a queue).


def decider(source: str, target: str, *, down_for: float = 120.0, can_move: bool = True) -> _Decider:
    return _Decider(SETTINGS, source, target, down_for, can_move, time.time())


def test_the_sweep_never_moves_a_three_hour_recording_to_cpu() -> None:
    for queue in ("gpu", "gpu.DQ"):
        decision = decider("gpu", "cpu")(message(job(THREE_HOURS), queue))
        assert decision.action is Action.keep and decision.message is None
        assert decision.reason.startswith("the task is too long for a CPU worker (it takes about 2701s")


def test_the_sweep_fails_it_once_no_gpu_came_within_the_wait() -> None:
    waiting = message(job(THREE_HOURS))
    waiting = waiting.copy(message_timestamp=int((time.time() - 2 * SETTINGS.gpu_max_wait) * 1000))
    decision = decider("gpu", "cpu", down_for=2 * SETTINGS.gpu_max_wait)(waiting)
    assert decision.action is Action.fail and decision.queue == "gpu.XQ"
    assert decision.reason.startswith("no GPU worker came within MORAG_GPU_MAX_WAIT=3600s")
    assert "and the task is too long for a CPU worker" in decision.reason


@pytest.mark.parametrize(("source", "target"), [("gpu", "cpu"), ("cpu", "gpu")])
def test_a_moved_copy_carries_the_new_queues_time_limit(source: str, target: str) -> None:
    body = job(1200.0, queue=source)
    decision = decider(source, target)(message(body, source, time_limit_ms=1))
    assert decision.action is Action.move and decision.message is not None
    assert decision.message.queue_name == target
    assert decision.message.options["time_limit"] == fit_job(body, target, SETTINGS).time_limit_s * 1000
    delayed = decider(source, target)(message(body, f"{source}.DQ", time_limit_ms=1))
    assert delayed.message is not None and delayed.message.queue_name == f"{target}.DQ"
    assert delayed.message.options["time_limit"] == decision.message.options["time_limit"]


# RabbitMQ's consumer timeout.


def test_a_queue_consumer_timeout_below_the_limits_is_reported(vhost: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(vhost))
    try:
        channel = connection.channel()
        channel.queue_declare("gpu", durable=True, arguments={"x-consumer-timeout": 600_000})
        channel.queue_declare("cpu", durable=True)
    finally:
        connection.close()
    settings = Settings(broker_url=vhost)
    [warning] = check_consumer_timeout(settings)
    assert warning.startswith(
        "queue gpu: RabbitMQ's consumer timeout is 600s (argument x-consumer-timeout), but a worker may"
        " hold its deliveries 1500s (MORAG_MAX_TIME_LIMIT_S)"
    )


def test_the_global_consumer_timeout_is_not_reported_as_too_short(vhost: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(vhost))
    try:
        connection.channel().queue_declare("gpu", durable=True)
    finally:
        connection.close()
    assert check_consumer_timeout(Settings(broker_url=vhost)) == []


def test_an_unreachable_management_api_is_no_error() -> None:
    assert check_consumer_timeout(Settings(broker_management_url="http://127.0.0.1:9")) == []
