"""Only a run that died with its worker counts as a delivery.

RabbitMQ flags ``redelivered`` every message a consumer held when it went
away, and every message put back on its queue. Neither makes a message
poison: a worker killed while it held a message it never started, and the
sweep putting back a task that waits for a GPU, must not bring an innocent
task closer to the dead letters.
"""

from __future__ import annotations

import os
import signal
import urllib.parse
from pathlib import Path

import httpx
import pytest

from tests.chaos.conftest import events, submit, task, wait_consumers, wait_for
from tests.conftest import Stack, management, queue_info

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

MARK = "morag.started."


def marks(stack: Stack) -> list[str]:
    """The start marks in the stack's vhost: one per task run that began and has not ended."""
    base, auth = management()
    vhost = urllib.parse.urlsplit(stack.env["MORAG_BROKER_URL"]).path.lstrip("/")
    response = httpx.get(f"{base}/api/queues/{vhost}", auth=auth, params={"columns": "name"}, timeout=10)
    return sorted(q["name"] for q in response.raise_for_status().json() if q["name"].startswith(MARK))


def ended(stack: Stack, task_id: str) -> dict | None:
    found = task(stack, task_id)
    return found if found["state"] in {"done", "failed", "canceled"} else None


@pytest.mark.timeout(600)
def test_a_message_held_but_never_started_is_not_counted(stack: Stack, tmp_path: Path) -> None:
    """A worker with two threads runs a task that lasts; it is told to stop (systemd's SIGTERM),
    so its idle thread stops, and takes one more message it will never start; then it is killed
    (systemd's SIGKILL when the stop times out). RabbitMQ delivers both again, flagged: the one
    that was running counts a delivery, the one that never started does not."""
    stack.start_server()
    stack.start_worker("cpu", "cpu-a", threads=2, modules=("tests.chaos.lingering",))
    wait_consumers(stack, "cpu")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "linger.md").write_text("# A task that lasts\n")
    (docs / "note.md").write_text("# A note\n\nNothing wrong with this one.\n")

    running = submit(stack, docs / "linger.md")["id"]
    wait_for("the lasting task to begin", lambda: len(marks(stack)) == 1, stack=stack)
    worker = stack.processes["cpu-a"]
    os.kill(worker.pid, signal.SIGTERM)
    wait_for(
        "the idle thread to stop",
        lambda: stack.log("cpu-a").count("worker thread stopped") == 1,
        stack=stack,
    )

    held = submit(stack, docs / "note.md")["id"]
    url = stack.env["MORAG_BROKER_URL"]
    wait_for(
        "the stopping worker to hold the second message",
        lambda: queue_info(url, "cpu").get("messages_unacknowledged") == 2,
        stack=stack,
    )
    assert events(task(stack, held), "started") == []
    assert len(marks(stack)) == 1  # the lasting task's: the held one never began
    os.killpg(worker.pid, signal.SIGKILL)
    stack.stop("cpu-a", signal.SIGKILL)

    stack.start_worker("cpu", "cpu-b", threads=2)
    done = {
        tid: wait_for(f"task {tid} to end", lambda t=tid: ended(stack, t), stack=stack)
        for tid in (running, held)
    }
    assert done[held]["state"] == "done", done[held]["error"]
    assert events(done[held], "redelivered") == []
    assert done[running]["state"] == "done", done[running]["error"]
    assert [e["detail"]["delivery"] for e in events(done[running], "redelivered")] == [2]
    assert marks(stack) == []  # every run ended: no mark is left behind


@pytest.mark.timeout(600)
def test_a_message_the_sweep_keeps_is_never_counted(stack: Stack, samples: Path) -> None:
    """A task that requires a GPU waits on ``gpu`` while no GPU worker lives: each sweep reads
    it and puts it back (RabbitMQ flags it ``redelivered`` each time). When a GPU worker comes,
    the task runs as delivered once, even with MORAG_MAX_DELIVERIES=1."""
    stack.env.update(
        MORAG_HEARTBEAT_INTERVAL="0.5",
        MORAG_WORKER_STALE_AFTER="2",
        MORAG_WORKER_DEAD_AFTER="4",
        MORAG_REROUTE_AFTER="1",
        MORAG_MAX_DELIVERIES="1",
    )
    stack.start_server()
    stack.start_worker("cpu")  # a live queue to move to: the sweep scans ``gpu``
    wait_consumers(stack, "cpu")
    waiting = submit(stack, samples / "speech.mp3", gpu="require")["id"]
    assert task(stack, waiting)["route"]["queue"] == "gpu"

    url = stack.env["MORAG_BROKER_URL"]

    def put_back_twice() -> bool:
        stack.post("/api/v1/workers/sweep", timeout=30).raise_for_status()
        return queue_info(url, "gpu").get("message_stats", {}).get("redeliver", 0) >= 2

    # Each sweep after the first reads the task flagged by the one before.
    wait_for("the sweep to keep the task three times", put_back_twice, timeout=180, stack=stack, interval=1.0)
    assert task(stack, waiting)["state"] == "queued"

    stack.start_worker("gpu", MORAG_WHISPER_DEVICE="cpu")
    done = wait_for("the task to end", lambda: ended(stack, waiting), timeout=300, stack=stack)
    assert done["state"] == "done", done["error"]
    assert done["worker"] == "gpu-worker"
    assert events(done, "redelivered") == []
    assert marks(stack) == []
