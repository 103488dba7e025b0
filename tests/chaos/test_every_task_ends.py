"""Every task reaches an end when the server's own parts fail: the broker restarts during a submit,
the liveness process dies, a task is recorded but never published, a running task's message is lost,
a queued task's message is purged from its queue."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from pipeline.config import Settings
from pipeline.services import build_services
from pipeline.store import Task
from pipeline.submission import SubmitOptions, record
from tests.chaos.conftest import PrivateRabbitmq, submit, wait_consumers
from tests.conftest import Stack, management, queue_depth, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def health(stack: Stack) -> dict:
    import httpx

    return httpx.get(f"{stack.url}/healthz", timeout=30).json()


def record_unpublished(stack: Stack, path: Path) -> Task:
    """What a server that died between recording a task and publishing it leaves behind."""
    settings = Settings(
        data_dir=stack.data_dir, secret_key=SecretStr(stack.env["MORAG_SECRET_KEY"]), file_access="shared"
    )
    services = build_services(settings)
    upload = stack.data_dir / "uploads" / "crash-upload"
    upload.parent.mkdir(exist_ok=True)
    shutil.copy(path, upload)
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    return record(services, upload, path.name, digest, upload.stat().st_size, SubmitOptions(), lambda: 0)


def finished(stack: Stack, task_id: str) -> dict | None:
    """The task once it is done."""
    task = stack.get(f"/api/v1/tasks/{task_id}").json()
    return task if task["state"] == "done" else None


def sweep_until(stack: Stack, what: str, check, timeout: float = 180):  # type: ignore[no-untyped-def]
    """Ask for sweeps (they run the reconciler) until ``check`` holds."""

    def poke():  # type: ignore[no-untyped-def]
        stack.post("/api/v1/workers/sweep", timeout=30)
        return check()

    return wait_for(what, poke, timeout=timeout, stack=stack, interval=2)


def test_submit_during_a_broker_restart_waits_then_succeeds(
    private_stack: Stack, private_rabbitmq: PrivateRabbitmq, samples: Path
) -> None:
    stack = private_stack
    stack.start_server()
    stack.start_worker("cpu", "local-cpu", enroll=False, MORAG_FILE_ACCESS="shared")
    wait_consumers(stack, "cpu", 1)
    private_rabbitmq.ctl("stop_app")
    back = threading.Timer(8, lambda: private_rabbitmq.ctl("start_app"))
    back.start()
    try:
        proc = stack.cli("submit", "--json", str(samples / "report.html"), timeout=300)
    finally:
        back.join()
    assert proc.returncode == 0, proc.stderr + stack.all_logs()
    task = json.loads(proc.stdout)
    assert task["state"] == "done"
    events = stack.get(f"/api/v1/tasks/{task['id']}").json()["events"]
    assert [e["detail"]["by"] for e in events if e["event"] == "published"] == ["submit"]


def test_the_liveness_process_is_started_again_when_it_dies(stack: Stack) -> None:
    stack.start_server()
    first = wait_for("a healthy server", lambda: (h := health(stack))["status"] == "ok" and h, stack=stack)
    assert first["parts"]["scheduler"]["process"] and first["parts"]["sftp"]["ok"]
    server = stack.processes["server"].pid
    children = subprocess.run(["pgrep", "-P", str(server), "-f", "pipeline.fleet.scheduler"],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)
    again = wait_for(
        "the liveness process started again",
        lambda: (h := health(stack))["parts"]["scheduler"]["restarts"] >= 1 and h["status"] == "ok" and h,
        stack=stack,
    )
    assert again["parts"]["scheduler"]["process"]
    # The new one sweeps: a sweep asked for now is run and its time written.
    before = again["parts"]["scheduler"]["last_sweep"] or 0
    sweep_until(stack, "a sweep by the new process",
                lambda: (health(stack)["parts"]["scheduler"]["last_sweep"] or 0) > before)  # fmt: skip


def test_a_task_recorded_but_never_published_is_published_and_ends(stack: Stack, samples: Path) -> None:
    stack.env["MORAG_PUBLISH_WAIT_S"] = "0"
    stack.start_server()
    stack.start_worker("cpu", "local-cpu", enroll=False, MORAG_FILE_ACCESS="shared")
    task = record_unpublished(stack, samples / "report.html")
    done = sweep_until(stack, "the task done", lambda: finished(stack, task.id))
    published = [e["detail"]["by"] for e in done["events"] if e["event"] == "published"]
    assert published == ["reconciler"]
    assert [e["event"] for e in done["events"]].count("done") == 1


def test_a_running_task_whose_message_was_lost_is_delivered_again(stack: Stack, samples: Path) -> None:
    stack.env["MORAG_TASK_LOST_AFTER_S"] = "10"
    stack.start_server()
    stack.start_worker("cpu", "local-cpu", enroll=False, MORAG_FILE_ACCESS="shared")
    task = record_unpublished(stack, samples / "report.html")
    # A worker that took it and vanished with its message (its outcome never came).
    settings = Settings(data_dir=stack.data_dir, secret_key=SecretStr(stack.env["MORAG_SECRET_KEY"]))
    store = build_services(settings).store
    store.mark_published(task.id, "lost-message", "cpu", by="submit")
    store.mark_running(task.id, "vanished-worker", 1)
    started = time.time()
    done = sweep_until(stack, "the task done", lambda: finished(stack, task.id))
    requeued = [e for e in done["events"] if e["event"] == "requeued"]
    assert len(requeued) == 1 and requeued[0]["ts"] >= started + 10
    assert "vanished-worker" in requeued[0]["detail"]["reason"]
    assert done["worker"] == "local-cpu" and done["deliveries"] == 2


def test_a_queued_task_whose_message_was_purged_is_delivered_again(stack: Stack, samples: Path) -> None:
    """An operator purges the queue in the management UI (or the broker loses it): the task, still
    queued, has no message anywhere; the reconciler sees the queue empty on two sweeps and sends it again."""
    import httpx

    stack.env["MORAG_VANISHED_AFTER_S"] = "3"
    stack.start_server()
    task_id = submit(stack, samples / "report.html")["id"]  # no worker yet: it waits in ``cpu``
    amqp = stack.env["MORAG_BROKER_URL"]
    wait_for("the message in its queue", lambda: queue_depth(amqp, "cpu") == 1, 30, stack)
    base, auth = management()
    vhost = amqp.rsplit("/", 1)[1]
    httpx.delete(f"{base}/api/queues/{vhost}/cpu/contents", auth=auth, timeout=10).raise_for_status()
    assert queue_depth(amqp, "cpu") == 0
    stack.start_worker("cpu", "local-cpu", enroll=False, MORAG_FILE_ACCESS="shared")
    done = sweep_until(stack, "the task done", lambda: finished(stack, task_id))
    requeued = [e for e in done["events"] if e["event"] == "requeued"]
    assert len(requeued) == 1 and "its message is in no queue" in requeued[0]["detail"]["reason"]
    assert [e["event"] for e in done["events"]].count("done") == 1
    assert done["deliveries"] == 2
