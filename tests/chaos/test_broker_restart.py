"""RabbitMQ restarted in the middle of a run: messages the workers held are redelivered, and every
task completes, none twice, none lost."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.chaos.conftest import PrivateRabbitmq, consumers, events, submit, wait_consumers, wait_for
from tests.conftest import Stack, queue_depth

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

TASKS = 200


@pytest.mark.timeout(900)
def test_broker_restart_mid_run(
    private_stack: Stack, private_rabbitmq: PrivateRabbitmq, tmp_path: Path
) -> None:
    stack = private_stack
    stack.start_server()
    wait_consumers(stack, "control", 1)

    # Every task queued first, so the restart finds most of them waiting.
    docs = tmp_path / "docs"
    docs.mkdir()
    ids = []
    for n in range(TASKS):
        path = docs / f"doc-{n:03}.md"
        path.write_text(f"# Document {n}\n\n" + f"Paragraph {n} of the restart test.\n\n" * 50)
        ids.append(submit(stack, path)["id"])

    def counts() -> dict[str, int]:
        return stack.get("/api/v1/tasks", params={"limit": 1}, timeout=30).json()["counts"]

    stack.start_worker("cpu", "cpu-a", threads=2)
    stack.start_worker("cpu", "cpu-b", threads=2)
    wait_for("the first tasks done", lambda: counts()["done"] >= 10, stack=stack)
    # rabbitmqctl takes seconds to boot, long enough for a fast machine to finish the whole run
    # before the broker stops. The workers are frozen meanwhile, holding the messages they took,
    # and thawed once every connection is gone: the restart always finds work in flight.
    workers = [stack.processes[name] for name in ("cpu-a", "cpu-b")]
    for worker in workers:
        os.killpg(worker.pid, signal.SIGSTOP)
    done_before = counts()["done"]
    assert done_before < TASKS, "the run ended before the restart could test anything"
    private_rabbitmq.ctl("stop_app")
    for worker in workers:
        os.killpg(worker.pid, signal.SIGCONT)
    private_rabbitmq.ctl("start_app")

    url = stack.env["MORAG_BROKER_URL"]
    # Workers and the server's control consumer come back by themselves.
    wait_consumers(stack, "cpu", 2)
    wait_consumers(stack, "control", 1)
    wait_for("every task done", lambda: counts()["done"] == TASKS, timeout=600, stack=stack)

    seen: dict[str, int] = {}
    redelivered = []
    for n, task_id in enumerate(ids):
        t = stack.get(f"/api/v1/tasks/{task_id}", timeout=30).json()
        for e in t["events"]:
            seen[e["event"]] = seen.get(e["event"], 0) + 1
        if events(t, "redelivered"):
            redelivered.append(t)
        assert t["state"] == "done"
        assert len(events(t, "done")) == 1
        outputs = stack.data_dir / "files" / "tasks" / task_id / "output"
        assert sorted(p.name for p in outputs.iterdir()) == [
            ".manifest.json",
            f"doc-{n:03}.json",
            f"doc-{n:03}.md",
        ]
        assert f"# Document {n}" in stack.get(f"/api/v1/tasks/{task_id}/result").text
    print(f"\n{done_before} of {TASKS} done when RabbitMQ restarted; events after: {seen}")
    # The restart took messages from the workers: RabbitMQ delivered them again. A run that was
    # under way when the connection dropped is counted (a `redelivered` note with its delivery
    # count); one that finished meanwhile is acknowledged with a `skipped` note. Either way the
    # task says so and ended once.
    assert redelivered or seen.get("skipped"), f"no message was delivered again after the restart: {seen}"
    for t in redelivered:
        assert all(e["detail"]["delivery"] >= 2 for e in events(t, "redelivered")), t["events"]
        assert t["state"] == "done" and len(events(t, "done")) == 1
    assert counts() == {"queued": 0, "running": 0, "done": TASKS, "failed": 0, "canceled": 0}
    # A redelivered message of a task that had already ended is a no-op, not a dead letter.
    letters = stack.get("/api/v1/dead", timeout=30).json()["letters"]
    assert letters == [], f"dead letters after every task ended: {letters}"
    for queue in ("cpu", "cpu.XQ", "control.XQ"):
        assert queue_depth(url, queue) == 0, queue
    assert consumers(url, "cpu") == 2
