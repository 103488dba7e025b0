"""The dashboard's data endpoint with 1,000 workers' records and 100,000 tasks in the store.

A store (SQLite, the default) is filled with T tasks (88% done with their
timings, 6% failed, 4% queued, 2% running; two kinds; spread over the
workers) and W workers' heartbeats (half GPU, half CPU, a third of them
holding a task), on a fresh vhost of the real RabbitMQ. The API runs
in-process (FastAPI's TestClient, an admin key in every request).

Timed, median of R requests each:

- baseline: ``GET /api/v1/tasks`` (the newest 50 tasks, and the counts by state);
- reading every worker's record once (``Registry.list``), which the dashboard does per request;
- ``GET /api/v1/dashboard``: workers, queues (RabbitMQ's management API, its
  answer reused for two seconds as every dashboard's poll reuses it), the
  newest 50 tasks and the counts: what each open dashboard asks every two seconds;
- the same, filtered by kind and by worker;
- ``GET /api/v1/dashboard/history``: six hours of one-minute samples;
- writing one history sample (what each sweep adds).

    .venv/bin/python -m bench.dashboard_cost --workers 1000 --tasks 100000 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from pydantic import SecretStr

from pipeline.api.app import create_app
from pipeline.api.auth import Authenticator
from pipeline.brokers import install
from pipeline.brokers.stub import build_stub_broker
from pipeline.config import Settings, use_settings
from pipeline.fleet.registry import Registry
from pipeline.history import History
from pipeline.schema import tasks as tasks_table
from pipeline.security.ratelimit import FailureLimiter
from pipeline.services import build_services
from pipeline.store import TaskStore, new_task_id
from tests.conftest import fresh_vhost

NOW = time.time()


def fill_tasks(store: TaskStore, count: int, workers: int) -> None:
    """``count`` tasks written in batches of 5,000 (setup, not timed)."""
    rows = []
    for i in range(count):
        created = NOW - (count - i) * 0.5
        kind = "transcribe" if i % 3 else "convert"
        queue = "gpu" if kind == "transcribe" and i % 5 else "cpu"
        state = ("done", "failed", "queued", "running")[
            0 if i % 50 < 44 else 1 if i % 50 < 47 else 2 if i % 50 < 49 else 3
        ]
        started = created + 2 if state != "queued" else None
        finished = created + 30 if state in ("done", "failed") else None
        timings = {"load_s": 0.4, "transcribe_s": 20.0} if kind == "transcribe" else {"convert_s": 8.0}
        rows.append({
            "id": new_task_id(), "kind": kind, "state": state, "filename": f"file-{i}.mp4",
            "input": json.dumps({"path": f"tasks/x/input/file-{i}.mp4", "sha256": "0" * 64, "size": 1000}),
            "options": json.dumps({"priority": "normal", "gpu": "prefer"}),
            "route": json.dumps({"queue": queue, "priority": ("normal", "high")[i % 2],
                                 "reasons": [f"{queue}: a live {queue} worker, queue short"]}),
            "progress": json.dumps({"stage": "done", "percent": 100.0} if state == "done" else {}),
            "outputs": json.dumps([{"format": "txt", "path": "x", "sha256": "0"}] * (state == "done")),
            "result": json.dumps({"timings": timings} if state == "done" else {}),
            "error": "bad input" if state == "failed" else None,
            "worker": f"{queue}-{i % workers:05d}" if state != "queued" else None,
            "attempts": 1, "created_at": created, "updated_at": finished or created, "started_at": started,
            "finished_at": finished, "published_at": created, "deliveries": 1,
        })  # fmt: skip
        if len(rows) == 5000:
            _write(store, rows)
            rows = []
    if rows:
        _write(store, rows)


def _write(store: TaskStore, rows: list[dict]) -> None:
    with store.db.transaction() as db:
        db.execute(tasks_table.insert(), rows)


def fill_workers(registry: Registry, count: int) -> None:
    for i in range(count):
        queue = "gpu" if i % 2 else "cpu"
        gpus = (
            [{"name": "NVIDIA H200", "vram_total_mb": 143771, "vram_free_mb": 100000}]
            if queue == "gpu"
            else []
        )
        registry.heartbeat(
            {
                "worker": f"{queue}-{i:05d}", "session": f"s{i}", "host": f"host-{i // 8}", "pid": 1000 + i,
                "capability": queue, "queues": [queue], "threads": 1,
                "hardware": {"cpu_cores": 16, "gpus": gpus}, "models": ["tiny.en@cuda"],
                "current": [new_task_id()] if i % 3 == 0 else [], "done": i, "failed": i % 4,
                "speed": {"task_s": 10.0 + i % 7, "realtime_factor": 0.03, "samples": 5}, "ts": NOW,
            },
            now=NOW - (5.0 if i % 10 else 90.0),
        )  # fmt: skip


def fill_history(history: History, hours: float) -> None:
    for minute in range(int(hours * 60)):
        at = NOW - hours * 3600 + minute * 60
        gpu = {"messages": minute % 40, "consumers": 4, "dead": 1, "live": 4}
        cpu = {"messages": minute % 9, "consumers": 2, "dead": 0, "live": 2}
        history.record({"gpu": gpu, "cpu": cpu}, now=at)


def median_ms(call: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, fresh_vhost() as vhost:
        settings = use_settings(
            Settings(
                data_dir=Path(tmp), secret_key="b" * 48, broker_url=SecretStr(vhost), file_access="shared"
            )
        )
        services = build_services(settings)
        setup = time.perf_counter()
        fill_tasks(services.store, args.tasks, args.workers)
        registry = Registry.from_settings(settings)
        fill_workers(registry, args.workers)
        history = History(settings)
        fill_history(history, 6)
        setup = time.perf_counter() - setup
        broker = install(build_stub_broker(settings))
        auth = Authenticator(services.apikeys, services.tokens, FailureLimiter())
        key, _ = services.apikeys.create("bench", "admin")
        client = TestClient(create_app(services, broker, gpu_workers=lambda: 1, auth=auth))
        client.headers["Authorization"] = f"Bearer {key}"

        def get(path: str, **params: str) -> Callable[[], object]:
            def call() -> object:
                response = client.get(path, params=params)
                response.raise_for_status()
                return response

            return call

        overview = client.get("/api/v1/dashboard").json()
        assert len(overview["workers"]) == min(args.workers, 500) and len(overview["tasks"]) == 50
        print(f"dashboard data with {args.workers} workers' records and {args.tasks} tasks in the store "
              f"(SQLite; filled in {setup:.1f} s), median of {args.rounds} requests")  # fmt: skip
        base = median_ms(get("/api/v1/tasks"), args.rounds)
        print(f"  baseline: GET /api/v1/tasks (newest 50, counts)   {base:8.1f} ms")
        ms = median_ms(lambda: registry.list(), args.rounds)
        print(f"  {'reading every worker record (Registry.list)':<48} {ms:8.1f} ms   ratio {ms / base:6.2f}x")
        cases = [
            ("GET /api/v1/dashboard", get("/api/v1/dashboard")),
            ("GET /api/v1/dashboard?kind=convert", get("/api/v1/dashboard", kind="convert")),
            ("GET /api/v1/dashboard?worker=gpu-00001", get("/api/v1/dashboard", worker="gpu-00001")),
            ("GET /api/v1/dashboard/history (6 h)", get("/api/v1/dashboard/history")),
        ]
        for name, call in cases:
            ms = median_ms(call, args.rounds)
            print(f"  {name:<48} {ms:8.1f} ms   ratio {ms / base:6.2f}x")
        step = iter(range(1, 10**9))
        ms = median_ms(lambda: history.record({"gpu": {"live": 1}, "cpu": {"live": 1}}, now=NOW + next(step)),
                       args.rounds)  # fmt: skip
        print(f"  {'writing one history sample':<48} {ms:8.1f} ms   ratio {ms / base:6.2f}x")
        size = len(client.get("/api/v1/dashboard").content)
        print(f"  response size of GET /api/v1/dashboard: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
