"""What the dashboard shows of workers and tasks, worked out from the registry and the store.

Plain functions from records to the dictionaries the dashboard's data
endpoint returns: a worker's GPU, VRAM, current tasks and speed; a task's
route, reroutes, wait, transfer and processing times, and outputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select

from pipeline.fleet.registry import WorkerRecord
from pipeline.schema import tasks
from pipeline.store import State, TaskStore

#: Columns a task row of the dashboard needs (the task's events are left out).
TASK_COLUMNS = (
    tasks.c.id, tasks.c.kind, tasks.c.state, tasks.c.filename, tasks.c.route, tasks.c.progress,
    tasks.c.outputs, tasks.c.result, tasks.c.error, tasks.c.worker, tasks.c.attempts, tasks.c.created_at,
    tasks.c.updated_at, tasks.c.started_at, tasks.c.finished_at, tasks.c.deliveries,
)  # fmt: skip
#: Timings a worker reports for moving files and reports rather than processing them.
TRANSFER_TIMINGS = frozenset({"download_s", "upload_s", "transfer_s", "manifest_s", "report_s"})


def task_times(task: dict[str, Any], now: float) -> dict[str, float | None]:
    """A task's wait, transfer and processing seconds, and its whole time until now or its end.

    ``wait_s``: from submit to the first start (until now while queued).
    ``processing_s``: the stages that work on the content (probe, audio
    decoding, model load, transcription, rendering; or conversion).
    ``transfer_s``: the worker's transfer stages (download, upload, manifest,
    reports, ``TRANSFER_TIMINGS``) where it reports them; otherwise the rest
    of its last run. The last run starts at the last
    ``started`` event where the task's events are given, else at its first
    start (a retried task's rest then includes the time between its runs).
    """
    created, started, finished = task["created_at"], task["started_at"], task["finished_at"]
    starts = [e["ts"] for e in task.get("events") or [] if e.get("event") == "started"]
    last_run = starts[-1] if starts else started
    end = finished if finished is not None else now
    wait = (started if started is not None else end) - created
    timings = (task.get("result") or {}).get("timings") or {}
    numbers = {k: float(v) for k, v in timings.items() if isinstance(v, int | float)}
    processing = sum(v for k, v in numbers.items() if k not in TRANSFER_TIMINGS) if numbers else None
    transfer = sum(v for k, v in numbers.items() if k in TRANSFER_TIMINGS) if numbers else None
    if not transfer and last_run is not None and finished is not None and processing is not None:
        transfer = max(0.0, finished - last_run - processing)
    return {
        "wait_s": _seconds(max(0.0, wait)),
        "transfer_s": _seconds(transfer),
        "processing_s": _seconds(processing),
        "total_s": _seconds(max(0.0, end - created)),
    }


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def task_row(task: dict[str, Any], now: float) -> dict[str, Any]:
    """One task as the dashboard lists it."""
    route = task.get("route") or {}
    moves = route.get("moves") or []
    return {
        "id": task["id"],
        "kind": task["kind"],
        "state": task["state"],
        "filename": task["filename"],
        "queue": route.get("queue"),
        "priority": route.get("priority"),
        "reasons": route.get("reasons") or [],
        "reroutes": [{k: m.get(k) for k in ("from", "to", "reason", "by", "at")} for m in moves],
        "worker": task.get("worker"),
        "attempts": task.get("attempts", 0),
        "deliveries": task.get("deliveries", 0),
        "progress": task.get("progress") or {},
        "error": task.get("error"),
        "outputs": [o.get("format") for o in task.get("outputs") or [] if o.get("format")],
        "created_at": task["created_at"],
        "finished_at": task.get("finished_at"),
        **task_times(task, now),
    }


def _decoded(row: Any) -> dict[str, Any]:
    data = dict(row._mapping)
    for column in ("route", "progress", "outputs", "result"):
        data[column] = json.loads(data[column])
    return data


def recent_tasks(
    store: TaskStore,
    now: float,
    *,
    state: State | None = None,
    kind: str | None = None,
    worker: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The newest tasks first, filtered by state, kind and worker where given."""
    query = select(*TASK_COLUMNS).order_by(tasks.c.created_at.desc()).limit(limit)
    if state is not None:
        query = query.where(tasks.c.state == state)
    if kind:
        query = query.where(tasks.c.kind == kind)
    if worker:
        query = query.where(tasks.c.worker == worker)
    with store.db.read() as db:
        return [task_row(_decoded(row), now) for row in db.execute(query)]


def tasks_by_id(store: TaskStore, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The tasks of ``ids`` that the store knows (id, filename, kind, state, progress)."""
    wanted = sorted(set(ids))
    found: dict[str, dict[str, Any]] = {}
    columns = (tasks.c.id, tasks.c.filename, tasks.c.kind, tasks.c.state, tasks.c.progress)
    with store.db.read() as db:
        for start in range(0, len(wanted), 500):
            query = select(*columns).where(tasks.c.id.in_(wanted[start : start + 500]))
            for row in db.execute(query):
                found[row.id] = {
                    "id": row.id, "filename": row.filename, "kind": row.kind, "state": row.state,
                    "progress": json.loads(row.progress),
                }  # fmt: skip
    return found


def gpu_of(record: WorkerRecord) -> dict[str, Any] | None:
    """The worker's GPUs as one: model names, VRAM used and total (MiB); None without a GPU."""
    gpus = record.gpus
    if not gpus:
        return None
    names = sorted({str(g.get("name") or "GPU") for g in gpus})
    totals = [g.get("vram_total_mb") for g in gpus if isinstance(g.get("vram_total_mb"), int | float)]
    frees = [g.get("vram_free_mb") for g in gpus if isinstance(g.get("vram_free_mb"), int | float)]
    total = sum(totals) if totals else None
    used = total - sum(frees) if total is not None and len(frees) == len(totals) else None
    return {"count": len(gpus), "name": ", ".join(names), "vram_used_mb": used, "vram_total_mb": total}


def worker_row(record: WorkerRecord, now: float, current: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One worker as the dashboard lists it; ``current`` holds the tasks it runs (``tasks_by_id``)."""
    speed = record.speed or {}
    factor = speed.get("realtime_factor")
    return {
        "id": record.id,
        "host": record.host,
        "capability": record.capability,
        "queues": record.queues,
        "state": record.state.value,
        "reason": record.reason,
        "draining": record.draining,
        "processes": len(record.live_processes),
        "processes_known": len(record.processes),
        "threads": record.threads,
        "gpu": gpu_of(record),
        "last_seen": record.last_seen,
        "age_s": round(max(0.0, now - record.last_seen), 1),
        "current": [current.get(t, {"id": t}) for t in record.current],
        "done": record.done,
        "failed": record.failed,
        "skipped": record.skipped,
        # Seconds of audio transcribed per second of work: the inverse of the realtime factor.
        "audio_s_per_s": round(1 / factor, 2) if isinstance(factor, int | float) and factor > 0 else None,
        "task_s": speed.get("task_s"),
        "version": record.version,
    }
