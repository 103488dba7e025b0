"""The worker registry: heartbeats, goodbyes, the alive -> stale -> dead machine, and queue views,
on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.fleet.registry import (
    BadHeartbeat,
    Registry,
    WorkerNotFound,
    WorkerRecord,
    WorkerState,
    state_at,
)

T0 = 1_000_000.0


@pytest.fixture
def registry(database: Path | str) -> Registry:
    return Registry(database, stale_after=30, dead_after=120)


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
    assert registry.get("gpu-1", T0 + 200).state is WorkerState.dead
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
    assert registry.get("gpu-1", T0 + 2).state is WorkerState.alive
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


# A box started with --processes 2: one worker name, one session per process.


def events(registry: Registry, worker: str = "gpu-1") -> list[str]:
    return [e["event"] for e in registry.history(worker)]


def two_processes(registry: Registry, beats: int = 3) -> None:
    """Both processes of gpu-1 beat in turn, ``beats`` times each, one second apart."""
    for i in range(beats):
        registry.heartbeat(beat(session="s1", pid=101, current=["t1"], done=2), now=T0 + 2 * i)
        registry.heartbeat(beat(session="s2", pid=102, current=["t2", "t3"], done=5), now=T0 + 2 * i + 1)


def test_two_processes_of_one_name_are_one_worker_and_do_not_flap(registry: Registry) -> None:
    two_processes(registry)
    [worker] = registry.list(T0 + 6)
    assert (worker.id, worker.state) == ("gpu-1", WorkerState.alive)
    assert sorted(p.pid for p in worker.processes) == [101, 102]
    assert [p.state for p in worker.live_processes] == [WorkerState.alive] * 2
    assert worker.current == ["t1", "t2", "t3"]  # every task the box runs
    assert (worker.done, worker.failed, worker.threads) == (7, 2, 2)
    assert worker.gpus[0]["name"] == "NVIDIA H200" and worker.pid is None
    assert events(registry) == ["joined", "process joined"]
    gpu = registry.view("gpu", T0 + 6)
    assert (gpu.live, gpu.workers, gpu.known, gpu.in_flight) == (2, 1, 2, 3)


def test_one_goodbye_removes_only_that_process(registry: Registry) -> None:
    two_processes(registry)
    assert registry.goodbye(beat(session="s1", pid=101), now=T0 + 10)
    worker = registry.get("gpu-1", T0 + 11)
    assert worker.state is WorkerState.alive
    assert [(p.pid, p.state) for p in worker.processes] == [(102, WorkerState.alive), (101, WorkerState.gone)]
    assert [p.pid for p in worker.live_processes] == [102]
    assert worker.current == ["t2", "t3"]
    assert registry.view("gpu", T0 + 11).live == 1
    assert registry.live("gpu", T0 + 11) == [worker]
    assert registry.heartbeat(beat(session="s1", pid=101), now=T0 + 11) is None  # sent before its goodbye
    assert not registry.goodbye(beat(session="s1", pid=101), now=T0 + 12)
    history = registry.history("gpu-1")
    assert [e["event"] for e in history] == ["joined", "process joined", "process gone"]
    assert history[-1]["detail"]["pid"] == 101 and history[-1]["detail"]["processes_left"] == 1

    assert registry.goodbye(beat(session="s2", pid=102), now=T0 + 20)
    worker = registry.get("gpu-1", T0 + 21)
    assert (worker.state, worker.reason, worker.current) == (WorkerState.gone, "said goodbye", [])
    assert events(registry)[-1] == "gone"
    gpu = registry.view("gpu", T0 + 21)
    assert (gpu.live, gpu.workers, gpu.down_since) == (0, 0, T0 + 20)


def test_a_silent_process_dies_while_the_box_stays_alive(registry: Registry) -> None:
    two_processes(registry, beats=1)  # s1 at T0, s2 at T0 + 1
    for t in range(10, 131, 10):
        registry.heartbeat(beat(session="s2", pid=102, current=["t4"]), now=T0 + t)
    changes = registry.advance(T0 + 31)
    assert [(c.worker, c.process, c.before, c.after) for c in changes] == [
        ("gpu-1", "s1", WorkerState.alive, WorkerState.stale)
    ]
    assert changes[0].current == ("t1",) and changes[0].reason.startswith("pid 101: no heartbeat for 31s")
    changes = registry.advance(T0 + 125)
    assert [(c.process, c.after) for c in changes] == [("s1", WorkerState.dead)]
    worker = registry.get("gpu-1", T0 + 130)
    assert worker.state is WorkerState.alive
    assert [(p.pid, p.state) for p in worker.processes] == [(102, WorkerState.alive), (101, WorkerState.dead)]
    assert worker.current == ["t4"]  # the dead process's task is no longer running here
    assert registry.view("gpu", T0 + 130).live == 1
    assert events(registry) == ["joined", "process joined", "process stale", "process dead"]

    # Then the other one falls silent: now the box itself goes stale, then dead.
    changes = registry.advance(T0 + 161)
    assert [(c.process, c.before, c.after) for c in changes] == [(None, WorkerState.alive, WorkerState.stale)]
    assert changes[0].current == ("t4",)  # t1 was told when its process died
    changes = registry.advance(T0 + 251)
    assert [(c.process, c.after) for c in changes] == [(None, WorkerState.dead)]
    assert events(registry)[-2:] == ["stale", "dead"]
    assert registry.view("gpu", T0 + 251).down_since == T0 + 160


def test_a_box_whose_consumers_are_gone_dies_once(registry: Registry) -> None:
    two_processes(registry, beats=1)
    changes = registry.advance(T0 + 10, consumers={"gpu": 0, "cpu": 0})
    assert [(c.worker, c.process, c.after) for c in changes] == [("gpu-1", None, WorkerState.dead)]
    assert changes[0].current == ("t1", "t2", "t3")
    assert events(registry) == ["joined", "process joined", "dead"]


def test_a_box_drains_when_every_process_drains(registry: Registry) -> None:
    two_processes(registry, beats=1)
    registry.heartbeat(beat(session="s1", pid=101, draining=True), now=T0 + 2)
    worker = registry.get("gpu-1", T0 + 2)
    assert not worker.draining and [p.pid for p in worker.live_processes] == [102]
    assert registry.view("gpu", T0 + 2).live == 1
    registry.heartbeat(beat(session="s2", pid=102, draining=True), now=T0 + 3)
    assert registry.get("gpu-1", T0 + 3).draining and registry.live("gpu", T0 + 3) == []
    assert events(registry) == ["joined", "process joined", "draining"]


def test_a_box_restarted_after_it_ended_joins_anew(registry: Registry) -> None:
    two_processes(registry, beats=1)
    registry.advance(T0 + 200)
    assert registry.get("gpu-1", T0 + 200).state is WorkerState.dead
    registry.heartbeat(beat(session="s3", pid=201), now=T0 + 300)
    worker = registry.get("gpu-1", T0 + 300)
    assert worker.state is WorkerState.alive and [p.pid for p in worker.processes] == [201]
    assert worker.done == 3  # counts start again with the new processes
    assert events(registry) == ["joined", "process joined", "dead", "joined"]
    # A stale box comes back when any process is heard from again.
    registry.heartbeat(beat(session="s4", pid=202), now=T0 + 301)
    registry.heartbeat(beat(session="s3", pid=201), now=T0 + 340)
    assert events(registry)[-2:] == ["process joined", "revived"]


def test_a_database_from_before_processes_opens_with_one_process_per_worker(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "tasks.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE workers (id TEXT PRIMARY KEY, session TEXT NOT NULL, host TEXT NOT NULL DEFAULT '',"
        " pid INTEGER, capability TEXT NOT NULL, queues TEXT NOT NULL DEFAULT '[]', threads INTEGER NOT NULL"
        " DEFAULT 0, hardware TEXT NOT NULL DEFAULT '{}', models TEXT NOT NULL DEFAULT '[]', current TEXT NOT"
        " NULL DEFAULT '[]', done INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, skipped"
        " INTEGER NOT NULL DEFAULT 0, speed TEXT NOT NULL DEFAULT '{}', draining INTEGER NOT NULL DEFAULT 0,"
        " version TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, reason TEXT, first_seen REAL NOT NULL,"
        " joined_at REAL NOT NULL, last_seen REAL NOT NULL, sent_at REAL, state_since REAL NOT NULL,"
        " booted_at REAL, beats INTEGER NOT NULL DEFAULT 0)"
    )
    old.execute(
        "INSERT INTO workers (id, session, host, pid, capability, queues, current, done, state, first_seen,"
        " joined_at, last_seen, state_since, beats) VALUES ('cpu-1', 'old', 'box', 7, 'cpu', '[\"cpu\"]',"
        f" '[\"t9\"]', 4, 'alive', {T0}, {T0}, {T0}, {T0}, 12)"
    )
    old.commit()
    old.close()
    registry = Registry(path, stale_after=30, dead_after=120)
    worker = registry.get("cpu-1", T0 + 1)
    assert (worker.state, worker.current, worker.done, worker.pid) == (WorkerState.alive, ["t9"], 4, 7)
    assert [p.session for p in worker.processes] == ["old"]
    registry.heartbeat(beat("cpu-1", session="old", queues=("cpu",), pid=7), now=T0 + 2)
    assert events(registry, "cpu-1") == []  # the same process, not a new one
    assert registry.view("cpu", T0 + 2).live == 1
