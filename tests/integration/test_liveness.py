"""Liveness on a real RabbitMQ: moving messages, the sweep, heartbeats from real workers, the registry."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pika
import pytest

from pipeline import hardware
from pipeline.brokers.move import Action, Decision, move_messages
from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import Settings
from pipeline.fleet.registry import Registry
from pipeline.fleet.scheduler import LOCK_NAME, STANDBY
from pipeline.fleet.sweep import Sweeper
from pipeline.store import State, Task, TaskStore, new_task_id
from tests.conftest import Stack, queue_depth, wait_for

pytestmark = [pytest.mark.rabbitmq]


@pytest.fixture
def settings(vhost: str, tmp_path: Path) -> Settings:
    return Settings(broker_url=vhost, data_dir=tmp_path / "data", reroute_after=30, gpu_max_wait=600)


@pytest.fixture
def broker(settings: Settings) -> Iterator[dramatiq.Broker]:
    """A RabbitMQ broker on the test's vhost with the pipeline's queues declared."""
    broker = build_rabbitmq_broker(settings)
    for queue in ("gpu", "cpu", "control"):
        broker.declare_queue(queue, ensure=True)
    yield broker
    broker.close()


def task_message(task_id: str, gpu: str = "prefer", actor: str = "transcribe", queue: str = "gpu"):
    job = {"task_id": task_id, "kind": "transcribe", "route": {"queue": queue, "gpu": gpu}}
    return dramatiq.Message(queue_name=queue, actor_name=actor, args=(), kwargs={"job": job}, options={})


def drain(url: str, queue: str) -> list[dramatiq.Message]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        found = []
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append(dramatiq.Message.decode(body))
    finally:
        connection.close()


def test_moving_keeps_every_message_once(broker, vhost: str) -> None:
    sent = {}
    for i in range(600):
        gpu = ("prefer", "require", "never")[i % 3]
        message = task_message(f"t{i}", gpu)
        broker.enqueue(message)
        sent[message.message_id] = gpu

    def decide(message: dramatiq.Message) -> Decision:
        gpu = message.kwargs["job"]["route"]["gpu"]
        if gpu == "prefer":
            return Decision(Action.move, "test", message.copy(queue_name="cpu"))
        if gpu == "never":
            return Decision(Action.fail, "refused")  # no copy: rejected, RabbitMQ dead-letters it
        return Decision(Action.keep)

    report = move_messages(pika.URLParameters(vhost), "gpu", "cpu", decide)
    assert (report.waiting, report.scanned, len(report.moved), len(report.failed), report.kept) == (
        600, 600, 200, 200, 200,
    )  # fmt: skip
    assert report.errors == []
    where = collections.Counter()
    for queue in ("gpu", "cpu", "gpu.XQ"):
        for message in drain(vhost, queue):
            where[message.message_id] += 1
            assert sent[message.message_id] == {"gpu": "require", "cpu": "prefer", "gpu.XQ": "never"}[queue]
    assert set(where) == set(sent), "lost"
    assert max(where.values()) == 1, "doubled"


def test_a_missing_queue_moves_nothing(broker, vhost: str) -> None:
    broker.enqueue(task_message("t1"))
    report = move_messages(pika.URLParameters(vhost), "gpu", "nowhere", lambda m: Decision(Action.move))
    assert report.errors == ["queue nowhere does not exist"]
    assert queue_depth(vhost, "gpu") == 1


def make_task(store: TaskStore, gpu: str = "prefer") -> Task:
    task = Task(
        new_task_id(), "transcribe", State.queued, "a.mp3", {"path": "x"}, {}, {"queue": "gpu", "gpu": gpu}
    )
    return store.create(task)


def test_the_sweep_moves_waiting_tasks_after_reroute_after(settings: Settings, broker, vhost: str) -> None:
    registry = Registry.from_settings(settings)
    store = TaskStore(settings.db_path)
    now = time.time()
    registry.heartbeat({"worker": "gpu-1", "session": "a", "queues": ["gpu"]}, now=now - 100)
    registry.heartbeat({"worker": "cpu-1", "session": "b", "queues": ["cpu"]}, now=now)
    prefer = [make_task(store) for _ in range(5)]
    require = make_task(store, "require")
    document = make_task(store)
    for task in prefer:
        broker.enqueue(task_message(task.id))
    broker.enqueue(task_message(require.id, "require"))
    broker.enqueue(task_message(document.id, actor="convert_document", queue="cpu"))
    sweeper = Sweeper(settings, registry, store)
    consumers = {"gpu": 1, "cpu": 1}  # the hung GPU worker still holds its consumer

    # gpu-1's last heartbeat was at now - 100: stale from now - 70 (30 s of silence).
    early = sweeper.sweep(now=now - 45, consumers=consumers)  # no GPU worker for 25 s only
    assert early.summary()["transitions"] == ["gpu-1: alive -> stale (no heartbeat for 55s)"]
    assert early.moved == 0 and queue_depth(vhost, "gpu") == 6

    report = sweeper.sweep(now=now, consumers=consumers)  # for 70 s: more than MORAG_REROUTE_AFTER
    assert report.moved == 5 and report.failed == 0
    assert report.queues["gpu"] == {"live": 0, "known": 1, "down_s": 70.0}
    assert queue_depth(vhost, "gpu") == 1  # the task that requires a GPU waits
    moved = drain(vhost, "cpu")
    assert sorted(m.kwargs["job"]["task_id"] for m in moved if m.actor_name == "transcribe") == sorted(
        t.id for t in prefer
    )
    for message in moved:
        if message.actor_name == "transcribe":
            assert message.queue_name == "cpu" and message.kwargs["job"]["route"]["queue"] == "cpu"
            assert message.options["rerouted"][0]["from"] == "gpu"
    task = store.get(prefer[0].id)
    assert task.route["queue"] == "cpu"
    [event] = [e for e in task.events if e["event"] == "rerouted"]
    assert event["detail"]["by"] == "sweep"
    assert event["detail"]["reason"].startswith("no live gpu worker for 70s (MORAG_REROUTE_AFTER=30s)")


def test_a_task_that_requires_the_gpu_fails_after_gpu_max_wait(
    settings: Settings, broker, vhost: str
) -> None:
    settings = settings.model_copy(update={"gpu_max_wait": 50.0})
    registry = Registry.from_settings(settings)
    store = TaskStore(settings.db_path)
    now = time.time()
    registry.heartbeat({"worker": "gpu-1", "session": "a", "queues": ["gpu"]}, now=now - 100)
    require, recent = make_task(store, "require"), make_task(store, "require")
    # Queued before the GPU worker went.
    waiting = task_message(require.id, "require").copy(message_timestamp=int((now - 100) * 1000))
    broker.enqueue(waiting)
    broker.enqueue(task_message(recent.id, "require"))  # no GPU worker since, but queued just now
    report = Sweeper(settings, registry, store).sweep(now=now, consumers={"gpu": 0, "cpu": 0})
    assert report.failed == 1 and report.moved == 0
    task = store.get(require.id)
    assert task.state is State.failed
    assert "no GPU worker came within MORAG_GPU_MAX_WAIT=50s" in task.error and "--gpu require" in task.error
    [letter] = drain(vhost, "gpu.XQ")
    assert letter.options["dead_letter"]["reason"] == task.error
    assert store.get(recent.id).state is State.queued and queue_depth(vhost, "gpu") == 1


# With real processes: server and workers started as users start them.

FAST = {
    "MORAG_HEARTBEAT_INTERVAL": "0.5",
    "MORAG_WORKER_STALE_AFTER": "3",
    "MORAG_WORKER_DEAD_AFTER": "6",
    "MORAG_REROUTE_AFTER": "2",
}


def whisper_device() -> str:
    """Where ``MORAG_WHISPER_DEVICE=auto`` runs the model on this machine: CUDA where CTranslate2
    sees a device, else the CPU."""
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def workers(stack: Stack) -> dict:
    return stack.get("/api/v1/workers", timeout=10).json()


def wait_workers(stack: Stack, condition, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = workers(stack)
        by_id = {w["id"]: w for w in listing["workers"]}
        if condition(by_id):
            return by_id
        time.sleep(0.2)
    raise AssertionError(f"registry never matched: {listing}\n{stack.all_logs()}")


@pytest.mark.slow
def test_workers_report_and_a_goodbye_moves_submits_to_cpu(stack: Stack, samples: Path) -> None:
    stack.env.update(FAST)
    stack.start_server()
    stack.start_worker("gpu")
    stack.start_worker("cpu", threads=2)
    by_id = wait_workers(stack, lambda w: {"gpu-worker", "cpu-worker"} <= set(w))
    gpu, cpu = by_id["gpu-worker"], by_id["cpu-worker"]
    assert (gpu["state"], gpu["capability"], gpu["queues"]) == ("alive", "gpu", ["gpu"])
    assert (cpu["state"], cpu["capability"], cpu["queues"]) == ("alive", "cpu", ["cpu"])
    assert gpu["hardware"]["cpu_cores"] >= 1
    # The GPUs this machine has (none on most test machines), as the worker saw them.
    assert [g["name"] for g in gpu["hardware"]["gpus"]] == [g["name"] for g in hardware.gpu_info()]
    assert gpu["version"] and gpu["host"]

    shown = stack.cli("workers")
    assert shown.returncode == 0, shown.stderr
    for text in ("gpu-worker", "cpu-worker", "alive", "gpu: 1 live worker(s)"):
        assert text in shown.stdout, shown.stdout

    proc = stack.cli("submit", "--json", str(samples / "speech.mp3"))
    task = json.loads(proc.stdout)
    assert task["state"] == "done" and task["worker"] == "gpu-worker"
    wait_workers(
        stack,
        lambda w: (
            w["gpu-worker"]["done"] == 1 and w["gpu-worker"]["models"] == [f"tiny.en@{whisper_device()}"]
        ),
    )

    stack.stop("gpu-worker")  # SIGTERM: a clean shutdown says goodbye
    wait_workers(stack, lambda w: w["gpu-worker"]["state"] == "gone")
    detail = stack.get("/api/v1/workers/gpu-worker", timeout=10).json()
    assert [e["event"] for e in detail["history"]] == ["joined", "draining", "gone"]

    proc = stack.cli("submit", "--no-wait", str(samples / "speech.mp3"))
    assert proc.returncode == 0, proc.stderr
    assert "-> queue cpu (no GPU worker is connected" in proc.stderr
    task_id = proc.stdout.strip()
    status = stack.cli("status", task_id)
    assert "rerouted" in status.stdout and "no GPU worker is connected" in status.stdout


def healthz_scheduler(stack: Stack) -> dict:
    """What ``/healthz`` says of the liveness scheduler."""
    return stack.get("/healthz", timeout=10).json()["parts"]["scheduler"]


def history(stack: Stack, worker: str) -> list[dict]:
    return stack.get(f"/api/v1/workers/{worker}", timeout=10).json()["history"]


def scheduler_processes(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_server_runs_one_scheduler_that_sends_the_sweep(stack: Stack) -> None:
    """One liveness scheduler per data directory, and its sweep runs by itself: a worker killed
    without a goodbye is written dead by a sweep nobody asked for, and ``/healthz`` shows that
    sweep. Ticks come on periodiq's minute: the waits allow two and a half of them."""
    stack.env.update(FAST)
    stack.start_server()
    server = stack.processes["server"]
    children = subprocess.run(["pgrep", "-P", str(server.pid), "-f", "pipeline.fleet.scheduler"],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
    assert len(children) == 1
    # Once the server's scheduler holds the lock, a second one on the same data directory stands by.
    lock = stack.data_dir / LOCK_NAME
    wait_for(
        "the server's scheduler to hold the lock",
        lambda: lock.exists() and lock.read_text().split() == children,
        60,
        stack,
    )
    second = subprocess.run(
        [sys.executable, "-m", "pipeline.fleet.scheduler", str(os.getpid())],
        env={**stack.env, "MORAG_LOG_JSON": "false"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == STANDBY
    assert "another liveness scheduler holds the lock" in second.stderr
    assert lock.read_text().split() == children

    # A worker killed with SIGKILL says no goodbye: only a sweep writes that it died.
    stack.start_worker("cpu", enroll=False)
    wait_workers(stack, lambda w: w.get("cpu-worker", {}).get("state") == "alive")
    os.killpg(stack.processes["cpu-worker"].pid, signal.SIGKILL)  # every process of it at once
    stack.stop("cpu-worker")
    killed_at = time.time()
    [dead] = wait_for(
        "a scheduled sweep to write the killed worker dead",
        lambda: [e for e in history(stack, "cpu-worker") if e["event"] == "dead"],
        150,
        stack,
        interval=1.0,
    )
    assert dead["ts"] > killed_at
    assert "no consumer left on cpu" in dead["detail"]["reason"] or "no heartbeat" in dead["detail"]["reason"]

    def swept_since_death() -> dict | None:
        part = healthz_scheduler(stack)
        return part if part["last_sweep"] and part["last_sweep"] >= dead["ts"] else None

    scheduler = wait_for("/healthz to show that sweep", swept_since_death, 60, stack)
    assert scheduler["ok"] and scheduler["process"] and not scheduler["standby"]
    assert scheduler["restarts"] == 0
    assert [e["event"] for e in history(stack, "cpu-worker")] == ["joined", "dead"]

    stack.stop("server")
    wait_for(
        "the scheduler to end with the server",
        lambda: not scheduler_processes(f"pipeline.fleet.scheduler {server.pid}"),
        30,
    )
