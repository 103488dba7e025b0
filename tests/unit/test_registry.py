"""The worker registry: heartbeats, goodbyes, the alive -> stale -> dead machine, and queue views."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.registry import BadHeartbeat, Registry, WorkerNotFound, WorkerRecord, WorkerState, state_at

T0 = 1_000_000.0


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "tasks.db", stale_after=30, dead_after=120)


def beat(worker: str = "gpu-1", session: str = "s1", queues: tuple[str, ...] = ("gpu",), **extra) -> dict:
    return {
        "worker": worker,
        "session": session,
        "host": "box",
        "pid": 42,
        "capability": "gpu" if "gpu" in queues else "cpu",
        "queues": list(queues),
        "threads": 1,
        "hardware": {"cpu_cores": 8, "gpus": [{"name": "NVIDIA H200", "vram_total_mb": 143771}]},
        "models": ["tiny.en@cuda"],
        "current": [],
        "done": 3,
        "failed": 1,
        "speed": {"task_s": 4.0, "realtime_factor": 0.05, "samples": 3},
        "version": "0.1.0",
        **extra,
    }


def states(registry: Registry, now: float) -> dict[str, str]:
    return {r.id: r.state.value for r in registry.list(now)}


def test_a_heartbeat_records_the_worker(registry: Registry) -> None:
    record = registry.heartbeat(beat(), now=T0)
    assert record is not None
    assert record.state is WorkerState.alive
    assert record.capability == "gpu" and record.queues == ["gpu"]
    assert record.gpus[0]["name"] == "NVIDIA H200"
    assert (record.done, record.failed, record.models) == (3, 1, ["tiny.en@cuda"])
    assert [e["event"] for e in registry.history("gpu-1")] == ["joined"]


def test_silence_makes_a_worker_stale_then_dead(registry: Registry) -> None:
    registry.heartbeat(beat(), now=T0)
    assert states(registry, T0 + 29) == {"gpu-1": "alive"}
    assert states(registry, T0 + 30) == {"gpu-1": "stale"}
    assert states(registry, T0 + 120) == {"gpu-1": "dead"}

    changes = registry.advance(T0 + 31)
    assert [(c.before, c.after) for c in changes] == [(WorkerState.alive, WorkerState.stale)]
    assert registry.advance(T0 + 32) == []  # written once
    changes = registry.advance(T0 + 121)
    assert [(c.before, c.after) for c in changes] == [(WorkerState.stale, WorkerState.dead)]
    assert "no heartbeat for 121s" in changes[0].reason
    assert [e["event"] for e in registry.history("gpu-1")] == ["joined", "stale", "dead"]


def test_a_heartbeat_revives_a_stale_or_dead_worker(registry: Registry) -> None:
    registry.heartbeat(beat(), now=T0)
    registry.advance(T0 + 200)
    assert registry.get("gpu-1").state is WorkerState.dead
    record = registry.heartbeat(beat(), now=T0 + 201)
    assert record is not None and record.state is WorkerState.alive
    history = registry.history("gpu-1")
    assert history[-1]["event"] == "revived" and history[-1]["detail"]["was"] == "dead"


def test_goodbye_marks_gone_at_once_and_late_beats_are_ignored(registry: Registry) -> None:
    registry.heartbeat(beat(), now=T0)
    assert registry.goodbye(beat(), now=T0 + 1)
    assert states(registry, T0 + 1) == {"gpu-1": "gone"}
    assert registry.heartbeat(beat(), now=T0 + 2) is None  # a beat of the same session, sent before
    assert states(registry, T0 + 2) == {"gpu-1": "gone"}
    assert not registry.goodbye(beat(), now=T0 + 3)
    # The worker restarted: a new session joins again.
    record = registry.heartbeat(beat(session="s2"), now=T0 + 10)
    assert record is not None and record.state is WorkerState.alive
    assert [e["event"] for e in registry.history("gpu-1")] == ["joined", "gone", "joined"]


def test_no_consumer_left_means_dead_at_once(registry: Registry) -> None:
    registry.heartbeat(beat(), now=T0)
    registry.heartbeat(beat("cpu-1", queues=("cpu",)), now=T0)
    changes = registry.advance(T0 + 10, consumers={"gpu": 0, "cpu": 1})
    assert [(c.worker, c.after) for c in changes] == [("gpu-1", WorkerState.dead)]
    assert "no consumer left on gpu" in changes[0].reason
    # Just joined: its consumer may not be counted yet.
    registry.heartbeat(beat("gpu-2", session="x"), now=T0 + 20)
    assert registry.advance(T0 + 21, consumers={"gpu": 0, "cpu": 1}) == []


def test_views_count_live_workers_and_since_when_none(registry: Registry) -> None:
    registry.heartbeat(beat("gpu-1"), now=T0)
    registry.heartbeat(beat("gpu-2", speed={"task_s": 8.0, "realtime_factor": 0.15}), now=T0)
    registry.heartbeat(beat("cpu-1", queues=("cpu",), current=["t1", "t2"]), now=T0)
    gpu = registry.view("gpu", T0 + 1)
    assert (gpu.live, gpu.known, gpu.down_since) == (2, 2, None)
    assert gpu.task_s == 6.0 and gpu.realtime_factor == pytest.approx(0.1)
    assert registry.view("cpu", T0 + 1).in_flight == 2

    registry.goodbye(beat("gpu-1"), now=T0 + 5)
    view = registry.view("gpu", T0 + 50)  # gpu-2 went stale at T0 + 30
    assert view.live == 0 and view.down_since == T0 + 30
    registry.advance(T0 + 60)
    assert registry.view("gpu", T0 + 90).down_since == T0 + 30
    registry.heartbeat(beat("gpu-3"), now=T0 + 100)
    registry.advance(T0 + 100)
    assert registry.view("gpu", T0 + 100).down_since is None


def test_draining_workers_take_no_new_work(registry: Registry) -> None:
    registry.heartbeat(beat(), now=T0)
    registry.heartbeat(beat(draining=True), now=T0 + 1)
    assert registry.live("gpu", T0 + 2) == []
    assert registry.get("gpu-1").state is WorkerState.alive
    assert registry.history("gpu-1")[-1]["event"] == "draining"


def test_malformed_heartbeats_are_refused(registry: Registry) -> None:
    with pytest.raises(BadHeartbeat):
        registry.heartbeat({"session": "s"})
    with pytest.raises(BadHeartbeat):
        registry.heartbeat({"worker": "", "session": "s"})
    with pytest.raises(WorkerNotFound):
        registry.get("nobody")


def test_state_at_is_pure_thresholds() -> None:
    record = WorkerRecord("w", "s", "cpu", WorkerState.alive, T0, T0, T0, T0)
    assert state_at(record, T0 + 5, 10, 20) is WorkerState.alive
    assert state_at(record, T0 + 10, 10, 20) is WorkerState.stale
    assert state_at(record, T0 + 25, 10, 20) is WorkerState.dead
    record.state = WorkerState.gone
    assert state_at(record, T0 + 1, 10, 20) is WorkerState.gone


def test_thresholds_must_be_ordered(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dead_after"):
        Registry(tmp_path / "x.db", stale_after=60, dead_after=30)
