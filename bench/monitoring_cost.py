"""The cost of monitoring: ``/metrics`` over a full store, and what scraping it costs the control consumer.

A store (SQLite, the server's default) is filled with W workers' records
(a heartbeat each, as the control consumer records them) and T tasks with
their events (most done, with transfer figures; some failed, canceled,
queued). Then, against a fresh RabbitMQ vhost:

- ``/metrics`` rendering: ``pipeline.metrics.collect`` (store, registry and
  broker) and the text format, as the endpoint does, keeping the ended
  tasks' totals between scrapes (``EndedTotals``); median of R rounds, and
  the first render after a start, which reads every ended task.
- the control consumer's work: the writes the control actors make for each
  task (``mark_running``, ``set_progress``, ``mark_done``, each message with
  its nonce), applied for S seconds from one thread as the server's control
  consumer does, once alone and once while another thread renders
  ``/metrics`` every E seconds (a scraper), in the same process as the
  server runs both. Outcomes per second of each, median of R rounds, and the
  ratio scraped/alone (goal: a cost of 5 % at most).

    .venv/bin/python -m bench.monitoring_cost --workers 1000 --tasks 100000 --seconds 20 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

from pipeline.config import Settings
from pipeline.db import Database, database_target
from pipeline.exposition import render
from pipeline.fleet.registry import Registry
from pipeline.metrics import EndedTotals, collect
from pipeline.schema import events, tasks
from pipeline.store import TaskStore
from tests.conftest import fresh_vhost

#: Shares of the tasks by state; the rest are queued, and the control consumer's work.
SHARES = {"done": 0.80, "failed": 0.05, "canceled": 0.01}


def fill(db: Database, count: int, now: float, queued_only: bool = False) -> list[str]:
    """Insert ``count`` tasks with their events, in batches; returns the ids of the queued ones."""
    rng = random.Random(7)
    queued: list[str] = []
    batch_tasks: list[dict] = []
    batch_events: list[dict] = []

    def flush() -> None:
        with db.transaction() as conn:
            if batch_tasks:
                conn.execute(tasks.insert(), batch_tasks)
            if batch_events:
                conn.execute(events.insert(), batch_events)
        batch_tasks.clear()
        batch_events.clear()

    for i in range(count):
        task_id = secrets.token_hex(16)
        pick = rng.random()
        state = "queued"
        edge = 0.0
        for name, share in () if queued_only else SHARES.items():
            edge += share
            if pick < edge:
                state = name
                break
        queue = "gpu" if rng.random() < 0.6 else "cpu"
        kind = "transcribe" if queue == "gpu" or rng.random() < 0.5 else "convert"
        created = now - rng.uniform(60, 30 * 24 * 3600)
        started = created + rng.expovariate(1 / 30) if state != "queued" else None
        finished = started + rng.expovariate(1 / 120) if started is not None else None
        size = rng.randint(10_000, 50_000_000)
        result = {}
        if state == "done":
            result = {"transfer": {"download_s": size / 80e6, "download_bytes": size,
                                   "upload_s": 0.05, "upload_bytes": 20_000}}  # fmt: skip
        route = {"queue": queue, "priority": "normal", "reasons": ["bench"],
                 "estimates": {"gpu_s": 12.0, "cpu_s": 90.0}, "fallback": None}  # fmt: skip
        if rng.random() < 0.02:
            route["moves"] = [{"from": "gpu", "to": "cpu", "reason": "no live gpu worker", "by": "sweep"}]
        batch_tasks.append(
            {
                "id": task_id, "kind": kind, "state": state, "filename": f"file{i}.mp4",
                "input": json.dumps({"path": f"tasks/{task_id}/input/f", "sha256": "0" * 64, "size": size}),
                "options": "{}", "route": json.dumps(route), "progress": "{}", "outputs": "[]",
                "result": json.dumps(result), "error": None, "worker": "w1" if started else None,
                "attempts": 1 if started else 0, "created_at": created, "updated_at": finished or created,
                "started_at": started, "finished_at": finished if state != "queued" else None,
                "published_at": created, "deliveries": 1,
            }
        )  # fmt: skip
        names = ["submitted", "published"] + (["started", state] if state != "queued" else [])
        if "moves" in route:
            names.append("rerouted")
        for name in names:
            detail = route["moves"][0] if name == "rerouted" else {}
            batch_events.append(
                {"task_id": task_id, "ts": created, "event": name, "detail": json.dumps(detail)}
            )
        if state == "queued":
            queued.append(task_id)
        if len(batch_tasks) >= 2000:
            flush()
    flush()
    return queued


def register(registry: Registry, workers: int) -> None:
    for i in range(workers):
        capability = "gpu" if i % 4 else "cpu"
        registry.heartbeat(
            {"worker": f"{capability}-box-{i}", "session": secrets.token_hex(8), "capability": capability,
             "queues": [capability], "threads": 1, "host": f"host{i}", "pid": 1000 + i,
             "hardware": {"gpus": [{"name": "NVIDIA L4", "vram_total_mb": 23034}]} if i % 4 else {},
             "speed": {"task_s": 40.0, "samples": 10}}
        )  # fmt: skip


def consume(store: TaskStore, ids: list[str], seconds: float) -> float:
    """Apply started, progress and completed for tasks of ``ids`` (popped) for ``seconds``; outcomes/s."""
    applied = 0
    started = time.perf_counter()
    while ids and time.perf_counter() - started < seconds:
        task_id = ids.pop()
        store.mark_running(task_id, "cpu-box-0", 1, nonce=secrets.token_hex(16))
        store.set_progress(task_id, {"stage": "converting", "percent": 50.0}, nonce=secrets.token_hex(16))
        store.get(task_id, events=False)
        store.mark_done(task_id, [], {}, "cpu-box-0", nonce=secrets.token_hex(16))
        applied += 3
    return applied / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each throughput run lasts")
    parser.add_argument("--scrape-every", type=float, default=5.0, help="seconds between scrapes")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, fresh_vhost() as broker_url:
        settings = Settings(_env_file=None, data_dir=Path(tmp), broker_url=broker_url)
        store = TaskStore(settings)
        registry = Registry.from_settings(settings)
        db = Database(database_target(settings))
        filled = time.perf_counter()
        fill(db, args.tasks, time.time())
        # The control consumer's work: queued tasks beyond those, enough for every run.
        queued = fill(db, int(args.rounds * 2 * args.seconds * 400), time.time(), queued_only=True)
        register(registry, args.workers)
        print(f"monitoring cost: {args.workers} workers, {args.tasks} tasks (+{len(queued)} to run)"
              f" in the store (sqlite), filled in {time.perf_counter() - filled:.0f}s")  # fmt: skip

        totals = EndedTotals()  # what the endpoint keeps between scrapes
        began = time.perf_counter()
        render(collect(settings, db, registry, totals=totals).families)
        first = time.perf_counter() - began
        renders = []
        for _ in range(max(args.rounds, 1)):
            began = time.perf_counter()
            text = render(collect(settings, db, registry, totals=totals).families)
            renders.append(time.perf_counter() - began)
        print(f"  /metrics render: median {1000 * statistics.median(renders):.0f} ms"
              f" ({len(text.splitlines())} lines, {args.rounds} rounds)")  # fmt: skip
        print(f"  first render after a start (every ended task read): {1000 * first:.0f} ms")

        alone, scraped, scrapes = [], [], 0
        for _ in range(args.rounds):
            alone.append(consume(store, queued, args.seconds))
            stop = threading.Event()

            def scraper(stop: threading.Event = stop) -> None:
                nonlocal scrapes
                while not stop.wait(args.scrape_every):
                    render(collect(settings, db, registry, totals=totals).families)
                    scrapes += 1

            thread = threading.Thread(target=scraper, daemon=True)
            thread.start()
            scraped.append(consume(store, queued, args.seconds))
            stop.set()
            thread.join()
        base, busy = statistics.median(alone), statistics.median(scraped)
        print(f"  control outcomes: {base:.0f}/s alone, {busy:.0f}/s scraped every {args.scrape_every:g}s"
              f" ({scrapes} scrapes)")  # fmt: skip
        ratio = busy / base
        print(f"  ratio scraped/alone: {ratio:.2f} (cost {100 * (1 - ratio):.1f}%, goal at most 5%)")


if __name__ == "__main__":
    main()
