"""The liveness sweep over 1,000 workers' records, and rerouting 10,000 waiting messages gpu -> cpu.

Sweep: a registry of W simulated workers (half GPU, half CPU; 70% alive, 15%
silent long enough to go stale, 15% long enough to be dead), swept by
``Sweeper.sweep`` with both queues live (so it moves nothing). Timed: the
first sweep (it writes every transition) and a second one (nothing changes).
Baseline: reading every record once (``Registry.list``). Median of R runs,
each on a freshly filled registry.

Reroute: M transcription messages that prefer the GPU wait in ``gpu``, each
with its task in the store; the only GPU worker has been dead longer than
MORAG_REROUTE_AFTER and a CPU worker is alive. Timed: the sweep that moves
them (every copy published with confirm before its original is acked, and
each move recorded on its task). Baseline, on the same messages: the plain
blocking way, one ``basic_get``, one confirmed publish, one ack per message.
Afterwards every message id is counted in both queues: lost and doubled must
be zero. Each round uses a fresh vhost of the real RabbitMQ.

    .venv/bin/python -m bench.sweep_and_reroute --workers 1000 --messages 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import dramatiq
import pika
from sqlalchemy import distinct, func, select

from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import Settings
from pipeline.fleet.registry import Registry
from pipeline.fleet.sweep import Sweeper
from pipeline.schema import events
from pipeline.store import State, Task, TaskStore, new_task_id
from tests.conftest import fresh_vhost

NOW = 2_000_000_000.0


def fill_registry(registry: Registry, workers: int) -> None:
    for i in range(workers):
        queue = "gpu" if i % 2 else "cpu"
        silent = 5.0 if i % 20 < 14 else (60.0 if i % 20 < 17 else 600.0)
        registry.heartbeat(
            {
                "worker": f"{queue}-{i:05d}",
                "session": f"s{i}",
                "host": f"host-{i // 8}",
                "queues": [queue],
                "hardware": {"cpu_cores": 16, "gpus": [{"name": "NVIDIA H200", "vram_total_mb": 143771}]},
                "models": ["tiny.en@cuda"],
                "current": [new_task_id()] if i % 3 == 0 else [],
                "done": i,
                "speed": {"task_s": 10.0 + i % 7, "realtime_factor": 0.03},
            },
            now=NOW - silent,
        )


def bench_sweep(workers: int, rounds: int) -> None:
    first, steady, baseline = [], [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(data_dir=Path(tmp))
            registry = Registry.from_settings(settings)
            fill_registry(registry, workers)
            sweeper = Sweeper(settings, registry, TaskStore(settings.db_path))
            started = time.perf_counter()
            registry.list(NOW)
            baseline.append(time.perf_counter() - started)
            started = time.perf_counter()
            report = sweeper.sweep(now=NOW, consumers={"gpu": 1, "cpu": 1})
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            sweeper.sweep(now=NOW + 1, consumers={"gpu": 1, "cpu": 1})
            steady.append(time.perf_counter() - started)
            changed = collections.Counter(f"{t.before}->{t.after}" for t in report.transitions)
    base = statistics.median(baseline)
    print(f"sweep over {workers} workers' records, median of {rounds} runs")
    print(f"  baseline: read every record once     {1000 * base:8.1f} ms")
    print(f"  sweep writing transitions            {1000 * statistics.median(first):8.1f} ms"
          f"   ratio {statistics.median(first) / base:5.1f}x   ({dict(changed)})")  # fmt: skip
    print(f"  sweep with nothing to change         {1000 * statistics.median(steady):8.1f} ms"
          f"   ratio {statistics.median(steady) / base:5.1f}x")  # fmt: skip


def fill_queue(url: str, store: TaskStore, messages: int) -> set[str]:
    """M task messages in ``gpu``, published in transactions of 1,000 (setup, not timed)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.tx_select()
    ids = set()
    tasks = []
    for i in range(messages):
        task_id = new_task_id()
        tasks.append(
            Task(
                task_id,
                "transcribe",
                State.queued,
                f"talk-{i}.mp4",
                {},
                {},
                {"queue": "gpu", "gpu": "prefer"},
            )
        )
        job = {
            "task_id": task_id,
            "kind": "transcribe",
            "filename": f"talk-{i}.mp4",
            "input": {"path": f"tasks/{task_id}/input/talk-{i}.mp4", "sha256": "0" * 64, "size": 12_345_678},
            "media": {"kind": "transcribe", "format": "video", "mime": "video/mp4", "size": 12_345_678,
                      "duration": 600.0, "pages": None, "notes": []},
            "options": {"priority": "normal", "gpu": "prefer"},
            "route": {"queue": "gpu", "gpu": "prefer"},
        }  # fmt: skip
        message = dramatiq.Message(
            queue_name="gpu", actor_name="transcribe", args=(), kwargs={"job": job},
            options={"broker_priority": 3, "time_limit": 1_500_000},
        )  # fmt: skip
        ids.add(message.message_id)
        properties = pika.BasicProperties(delivery_mode=2, priority=3)
        channel.basic_publish("", "gpu", message.encode(), properties)
        if i % 1000 == 999:
            channel.tx_commit()
    channel.tx_commit()
    connection.close()
    for task in tasks:
        store.create(task)
    return ids


def count_ids(url: str) -> dict[str, collections.Counter]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    found: dict[str, collections.Counter] = {}
    for queue in ("gpu", "cpu"):
        found[queue] = collections.Counter()
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            found[queue][dramatiq.Message.decode(body).message_id] += 1
    connection.close()
    return found


def check(url: str, sent: set[str]) -> tuple[int, int, int]:
    """(lost, doubled, left in gpu) by message id."""
    found = count_ids(url)
    seen = found["gpu"] + found["cpu"]
    lost = len(sent - set(seen))
    doubled = sum(n - 1 for n in seen.values() if n > 1)
    return lost, doubled, sum(found["gpu"].values())


def naive_move(url: str) -> int:
    """The blocking way: basic_get, publish with confirm, ack; one message at a time."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    source, target = connection.channel(), connection.channel()
    target.confirm_delivery()
    moved = 0
    while True:
        method, properties, body = source.basic_get("gpu")
        if method is None:
            break
        target.basic_publish("", "cpu", body, properties, mandatory=True)
        source.basic_ack(method.delivery_tag)
        moved += 1
    connection.close()
    return moved


def bench_reroute(messages: int, rounds: int) -> None:
    ours, naive, recorded = [], [], []
    problems = collections.Counter()
    for _ in range(rounds):
        with fresh_vhost() as url, tempfile.TemporaryDirectory() as tmp:
            settings = Settings(broker_url=url, data_dir=Path(tmp), reroute_after=60)
            broker = build_rabbitmq_broker(settings)
            for queue in ("gpu", "cpu"):
                broker.declare_queue(queue, ensure=True)
            broker.close()
            registry = Registry.from_settings(settings)
            store = TaskStore(settings.db_path)
            now = time.time()
            registry.heartbeat({"worker": "gpu-1", "session": "a", "queues": ["gpu"]}, now=now - 300)
            registry.heartbeat({"worker": "cpu-1", "session": "b", "queues": ["cpu"]}, now=now)
            sent = fill_queue(url, store, messages)

            started = time.perf_counter()
            report = Sweeper(settings, registry, store).sweep(now=now, consumers={"gpu": 1, "cpu": 1})
            ours.append(time.perf_counter() - started)
            lost, doubled, left = check(url, sent)
            errors = sum(len(scan.errors) for scan in report.moves)
            problems.update(lost=lost, doubled=doubled, left=left, errors=errors)
            recorded.append(_rerouted(store))
            assert report.moved == messages, report.summary()

        with fresh_vhost() as url, tempfile.TemporaryDirectory() as tmp:
            settings = Settings(broker_url=url, data_dir=Path(tmp))
            broker = build_rabbitmq_broker(settings)
            for queue in ("gpu", "cpu"):
                broker.declare_queue(queue, ensure=True)
            broker.close()
            sent = fill_queue(url, TaskStore(settings.db_path), messages)
            started = time.perf_counter()
            naive_move(url)
            naive.append(time.perf_counter() - started)
            lost, doubled, left = check(url, sent)
            problems.update(naive_lost=lost, naive_doubled=doubled)

    mine, base = statistics.median(ours), statistics.median(naive)
    print(f"rerouting {messages} waiting messages gpu -> cpu on RabbitMQ, median of {rounds} rounds")
    print(
        f"  baseline: get, confirmed publish, ack, one by one   {base:7.2f} s   {messages / base:8.0f} msg/s"
    )
    rate = messages / mine
    print(f"  sweep (pipelined confirms, moves recorded on tasks) {mine:7.2f} s   {rate:8.0f} msg/s"
          f"   speed ratio {base / mine:4.1f}x")  # fmt: skip
    print(f"  tasks with their move recorded: {min(recorded)} of {messages} (worst round)")
    print(
        f"  lost {problems['lost']}, doubled {problems['doubled']}, left in gpu {problems['left']},"
        f" errors {problems['errors']} (all rounds; baseline lost {problems['naive_lost']},"
        f" doubled {problems['naive_doubled']})"
    )
    if problems["lost"] or problems["doubled"] or problems["left"]:
        raise SystemExit("messages were lost or doubled")


def _rerouted(store: TaskStore) -> int:
    query = select(func.count(distinct(events.c.task_id))).where(events.c.event == "rerouted")
    with store.db.read() as db:
        return int(db.execute(query).scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bench_sweep(args.workers, max(args.rounds, 5))
    bench_reroute(args.messages, args.rounds)


if __name__ == "__main__":
    main()
