"""Routing by liveness and load: choose_route with a Capacity, a pure function."""

from __future__ import annotations

import pytest

from pipeline.config import Settings
from pipeline.routing import Capacity, Classification, QueueLoad, choose_route, estimate, expected_finish


def media(duration: float) -> Classification:
    return Classification("transcribe", "audio", "audio/mpeg", 1000, duration=duration)


SETTINGS = Settings()


def test_an_idle_gpu_worker_takes_a_transcription() -> None:
    capacity = Capacity(gpu_workers=1, gpu=QueueLoad(1, 0), cpu=QueueLoad(4, 0))
    route = choose_route(media(600), SETTINGS, capacity=capacity)
    assert route.queue == "gpu" and route.fallback is None


def test_no_live_gpu_worker_falls_back_to_cpu() -> None:
    route = choose_route(media(600), SETTINGS, capacity=Capacity(gpu_workers=0))
    assert route.queue == "cpu"
    assert route.fallback is not None and "no GPU worker" in route.fallback


def test_a_busy_gpu_queue_sends_the_task_to_idle_cpu_workers() -> None:
    # 40 ten-minute files ahead of one GPU worker that takes 30 s each: 20 minutes of wait;
    # two idle CPU workers finish a 60 s file in about 16 s.
    capacity = Capacity(
        gpu_workers=1,
        gpu=QueueLoad(workers=1, waiting=40, realtime_factor=0.05, task_s=30.0),
        cpu=QueueLoad(workers=2, waiting=0, realtime_factor=0.25),
    )
    route = choose_route(media(60), SETTINGS, capacity=capacity)
    assert route.queue == "cpu"
    assert route.fallback is not None and route.fallback.startswith("GPU queue busy (40 task(s)")
    assert route.reasons[0] == route.fallback


def test_a_long_file_stays_on_a_busy_gpu_when_cpu_would_be_slower() -> None:
    capacity = Capacity(
        gpu_workers=1,
        gpu=QueueLoad(workers=1, waiting=3, realtime_factor=0.05, task_s=30.0),
        cpu=QueueLoad(workers=2, waiting=0, realtime_factor=0.25),
    )
    assert choose_route(media(3600), SETTINGS, capacity=capacity).queue == "gpu"


def test_load_is_weighed_only_when_tasks_wait_for_the_gpu() -> None:
    # A 2 s clip is quicker on CPU even with an idle GPU, but an idle GPU worker takes it.
    capacity = Capacity(gpu_workers=1, gpu=QueueLoad(1, 0), cpu=QueueLoad(8, 0))
    assert choose_route(media(2), SETTINGS, capacity=capacity).queue == "gpu"


def test_require_and_never_ignore_load() -> None:
    busy = Capacity(gpu_workers=1, gpu=QueueLoad(1, 500, task_s=60.0), cpu=QueueLoad(8, 0))
    assert choose_route(media(60), SETTINGS, gpu="require", capacity=busy).queue == "gpu"
    assert choose_route(media(60), SETTINGS, gpu="require", capacity=Capacity(gpu_workers=0)).queue == "gpu"
    idle = Capacity(gpu_workers=3, gpu=QueueLoad(3, 0), cpu=QueueLoad(1, 50))
    assert choose_route(media(60), SETTINGS, gpu="never", capacity=idle).queue == "cpu"


def test_no_cpu_worker_means_no_move_by_load() -> None:
    capacity = Capacity(gpu_workers=1, gpu=QueueLoad(1, 500, task_s=60.0), cpu=QueueLoad(0, 0))
    assert choose_route(media(60), SETTINGS, capacity=capacity).queue == "gpu"


def test_expected_finish_shares_the_wait_among_workers() -> None:
    found = media(100)
    costs = estimate(found, SETTINGS)
    one = expected_finish(found, "cpu", QueueLoad(1, 10, task_s=20.0), costs)
    four = expected_finish(found, "cpu", QueueLoad(4, 10, task_s=20.0), costs)
    assert one == pytest.approx(10 * 20.0 + costs["cpu_s"])
    assert four == pytest.approx(10 * 20.0 / 4 + costs["cpu_s"])
    measured = expected_finish(found, "gpu", QueueLoad(1, 0, realtime_factor=0.1), costs)
    assert measured == pytest.approx(2.0 + 100 * 0.1)
    assert expected_finish(found, "gpu", QueueLoad(0, 0), costs) == float("inf")


def test_a_bare_count_still_routes() -> None:
    assert choose_route(media(60), SETTINGS, gpu_workers=0).queue == "cpu"
    assert choose_route(media(60), SETTINGS, gpu_workers=2).queue == "gpu"
