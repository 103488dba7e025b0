"""GPU workers that go away, hang or fail: their tasks finish on CPU workers, and every move is recorded.

Server and workers run as users start them, on a fresh vhost. Heartbeat and
liveness thresholds are set small; the tests ask for a sweep every second
(``POST /api/v1/workers/sweep``, the same actor periodiq sends every minute).
The CPU cost model is made pessimistic so that routing by load never sends
these tasks to ``cpu`` at submit: they go there only by failover. Every
worker runs the model on the CPU, also on a machine with a GPU: a task must
last long enough for the failover to find it waiting or running.

How soon a sweep moves waiting tasks is speed, measured by
``bench/sweep_and_reroute.py``; these tests check that the move comes, never
before ``MORAG_REROUTE_AFTER``, and wait for it with a generous deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.chaos.conftest import events, submit
from tests.conftest import SPOKEN_WORDS, Stack, queue_info

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

REROUTE_AFTER = 3.0
FAST = {
    "MORAG_HEARTBEAT_INTERVAL": "0.5",
    "MORAG_WORKER_STALE_AFTER": "2",
    "MORAG_WORKER_DEAD_AFTER": "4",
    "MORAG_REROUTE_AFTER": str(REROUTE_AFTER),
    "MORAG_CPU_REALTIME_FACTOR": "5",
    "MORAG_MAX_RETRIES": "1",
}

T = TypeVar("T")


def get(stack: Stack, path: str) -> Any:
    return stack.get(f"{path}", timeout=30).raise_for_status().json()


def task(stack: Stack, task_id: str) -> dict[str, Any]:
    return get(stack, f"/api/v1/tasks/{task_id}")


def workers(stack: Stack) -> dict[str, dict[str, Any]]:
    return {w["id"]: w for w in get(stack, "/api/v1/workers")["workers"]}


def sweeping_until(stack: Stack, what: str, check: Callable[[], T | None], timeout: float = 180) -> T:
    """Ask for a sweep every second until ``check`` returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.post("/api/v1/workers/sweep", timeout=30).raise_for_status()
        value = check()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}\n{stack.all_logs()}")


def all_ended(stack: Stack, ids: list[str]) -> dict[str, dict[str, Any]] | None:
    tasks = {tid: task(stack, tid) for tid in ids}
    return tasks if all(t["state"] in {"done", "failed", "canceled"} for t in tasks.values()) else None


def ended(stack: Stack, task_id: str) -> dict[str, Any] | None:
    found = task(stack, task_id)
    return found if found["state"] in {"done", "failed", "canceled"} else None


def both_alive(stack: Stack) -> bool:
    found = workers(stack)
    return set(found) == {"gpu-worker", "cpu-worker"} and {w["state"] for w in found.values()} == {"alive"}


def start(stack: Stack, **gpu_env: str) -> None:
    stack.env.update(FAST)
    stack.start_server()
    stack.start_worker("gpu", **{"MORAG_WHISPER_DEVICE": "cpu", **gpu_env})
    stack.start_worker("cpu", threads=2, MORAG_WHISPER_DEVICE="cpu")
    stack.wait_consumers("gpu")
    stack.wait_consumers("cpu")
    sweeping_until(stack, "both workers alive", lambda: both_alive(stack))


def test_stopping_every_gpu_worker_moves_waiting_tasks_to_cpu(stack: Stack, samples: Path) -> None:
    start(stack)
    ids = [submit(stack, samples / "speech.mp3")["id"] for _ in range(6)]
    assert {task(stack, tid)["route"]["queue"] for tid in ids} == {"gpu"}
    sweeping_until(stack, "the first task to start", lambda: task(stack, ids[0])["state"] != "queued")

    stack.stop("gpu-worker")  # SIGTERM: finishes what it holds, says goodbye
    gone = sweeping_until(
        stack, "the GPU worker gone", lambda: workers(stack)["gpu-worker"]["state"] == "gone"
    )
    assert gone
    history = get(stack, "/api/v1/workers/gpu-worker")["history"]
    assert [e for e in history if e["event"] == "gone"], history

    tasks = sweeping_until(stack, "every task to end", lambda: all_ended(stack, ids))
    assert {t["state"] for t in tasks.values()} == {"done"}, [t["error"] for t in tasks.values()]
    on_cpu = [t for t in tasks.values() if t["worker"] == "cpu-worker"]
    on_gpu = [t for t in tasks.values() if t["worker"] == "gpu-worker"]
    assert on_cpu, "no task was left waiting for the GPU"
    assert len(on_cpu) + len(on_gpu) == len(ids)
    for t in on_cpu:
        [move] = events(t, "rerouted")
        assert move["detail"]["by"] == "sweep" and (move["detail"]["from"], move["detail"]["to"]) == (
            "gpu",
            "cpu",
        )
        assert "no live gpu worker for" in move["detail"]["reason"]
        assert f"MORAG_REROUTE_AFTER={REROUTE_AFTER:g}s" in move["detail"]["reason"]
        # Never moved before MORAG_REROUTE_AFTER, counted from when the worker's last process ended
        # (its goodbye); the sweep may record it "gone" a moment later than that.
        down_for = float(re.search(r"no live gpu worker for (\d+)s", move["detail"]["reason"])[1])
        assert down_for >= REROUTE_AFTER, move
        assert t["route"]["queue"] == "cpu" and t["result"]["queue"] == "cpu"
        assert len(events(t, "done")) == 1
    for t in on_gpu:
        assert events(t, "rerouted") == []
    audited = [json.loads(line) for line in (stack.data_dir / "audit.log").read_text().splitlines()]
    moved = {e["task"] for e in audited if e["event"] == "task.rerouted" and e["by"] == "sweep"}
    assert moved == {t["id"] for t in on_cpu}
    # What `morag-pipeline status` shows a user.
    shown = stack.cli("status", on_cpu[0]["id"])
    assert "rerouted" in shown.stdout and "no live gpu worker for" in shown.stdout, shown.stdout
    assert "queue cpu" in shown.stdout


def test_a_hung_gpu_worker_is_detected_and_its_tasks_recovered(
    stack: Stack, samples: Path, long_audio: Path
) -> None:
    start(stack)
    held = submit(stack, long_audio)["id"]
    sweeping_until(stack, "the long task on the GPU worker", lambda: task(stack, held)["state"] == "running")
    # The worker's last heartbeat before it hangs must name the task it holds.
    sweeping_until(
        stack, "a heartbeat naming the task", lambda: workers(stack)["gpu-worker"]["current"] == [held]
    )
    waiting = [submit(stack, samples / "speech.mp3")["id"] for _ in range(3)]
    assert {task(stack, tid)["route"]["queue"] for tid in waiting} == {"gpu"}

    worker = stack.processes["gpu-worker"]
    os.killpg(worker.pid, signal.SIGSTOP)  # hung: no heartbeat, but its connection and consumer stay
    try:
        tasks = sweeping_until(stack, "the waiting tasks to end", lambda: all_ended(stack, waiting))
        assert {t["state"] for t in tasks.values()} == {"done"}, [t["error"] for t in tasks.values()]
        for t in tasks.values():
            assert t["worker"] == "cpu-worker"
            assert "no live gpu worker for" in events(t, "rerouted")[0]["detail"]["reason"]
        # Found by its silence, not by RabbitMQ: the hung worker still holds its consumer.
        assert queue_info(stack.env["MORAG_BROKER_URL"], "gpu")["consumers"] == 1
        assert workers(stack)["gpu-worker"]["state"] in ("stale", "dead")
        assert task(stack, held)["state"] == "running"  # still held by the hung worker
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # its connection goes: RabbitMQ requeues what it held
    stack.stop("gpu-worker")

    done = sweeping_until(stack, "the held task to end", lambda: ended(stack, held))
    assert done["state"] == "done", done["error"]
    assert done["worker"] == "cpu-worker" and done["route"]["queue"] == "cpu"
    assert [e["detail"]["worker"] for e in events(done, "started")] == ["gpu-worker", "cpu-worker"]
    assert events(done, "rerouted")[0]["detail"]["by"] == "sweep"
    lost = [e for e in done["events"] if e["event"] in ("worker stale", "worker dead")]
    assert lost and lost[0]["detail"]["worker"] == "gpu-worker"
    assert len(events(done, "done")) == 1


def test_a_gpu_failure_moves_the_task_to_cpu_with_the_reason(stack: Stack, samples: Path) -> None:
    # No CUDA device visible to the GPU worker, on any machine: CTranslate2 cannot load the
    # model on "cuda", which is a GpuError.
    start(stack, MORAG_WHISPER_DEVICE="cuda", CUDA_VISIBLE_DEVICES="")
    moved = submit(stack, samples / "speech.mp3")
    assert moved["route"]["queue"] == "gpu"
    required = submit(stack, samples / "speech.mp3", gpu="require")

    done = sweeping_until(stack, "the task to end", lambda: ended(stack, moved["id"]))
    assert done["state"] == "done", done["error"]
    assert done["worker"] == "cpu-worker" and done["result"]["device"] == "cpu"
    [move] = events(done, "rerouted")
    assert move["detail"]["by"] == "gpu-worker" and move["detail"]["to"] == "cpu"
    assert "GPU failed on gpu-worker: cannot load tiny.en on the GPU: CUDA failed" in move["detail"]["reason"]
    assert events(done, "retrying") == [] and events(done, "failed") == []
    assert done["route"]["queue"] == "cpu"
    result = stack.get(f"/api/v1/tasks/{done['id']}/result", timeout=30).text.lower()
    assert all(word in result for word in SPOKEN_WORDS), result

    # A task that requires the GPU is not moved: retried on the GPU, then failed with the reason.
    failed = sweeping_until(stack, "the GPU-only task to fail", lambda: ended(stack, required["id"]))
    assert failed["state"] == "failed"
    assert "cannot load tiny.en on the GPU" in failed["error"]
    assert events(failed, "rerouted") == [] and len(events(failed, "retrying")) == 1
    assert workers(stack)["gpu-worker"]["failed"] >= 2
