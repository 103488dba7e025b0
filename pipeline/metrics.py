"""The pipeline's metrics, read from the task store, the worker registry and RabbitMQ.

Nothing is counted in memory as it happens: every figure comes from the
server's database (tasks, their events, the registry) and from the broker,
so it is the same after a server restart, and the same from every server
replica. The figures of ended tasks, which no longer change, are read once
each and summed between calls (``EndedTotals``); the rest is read at each call.

- Tasks by state, kind and queue; the histograms of their wait (first start
  less submit), transfer (download and upload, as the worker timed them) and
  processing (first start to done, less transfers).
- Counters from the tasks' events, which are never deleted: tasks finished
  by state, retries, redeliveries, reroutes by reason; bytes transferred by
  done tasks.
- Workers by capability and state; each queue's live processes; the last
  heartbeat of every worker alive or stale.
- Each task queue's depth, consumers, delayed retries and dead letters
  (RabbitMQ), and the work waiting on it: the expected seconds to drain it
  with the live workers it has, the signal an autoscaler scales GPU boxes on.

``collect`` reads it all once; ``Snapshot.families`` is what ``/metrics``
renders, ``Snapshot.queues`` what ``morag-pipeline queues`` shows.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import JSON, ColumnElement, Double, case, cast, func, select

from pipeline import __version__
from pipeline.brokers import QUEUES
from pipeline.brokers.depths import QueueDepth, queue_depths
from pipeline.config import Settings
from pipeline.db import Database
from pipeline.exposition import Family
from pipeline.fleet.registry import TASK_QUEUES, Registry, WorkerRecord, WorkerState
from pipeline.logs import get_logger
from pipeline.schema import events, tasks
from pipeline.store import State

logger = get_logger(__name__)

#: Bucket bounds (seconds) of the histograms.
WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
PROCESSING_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
TRANSFER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Task events counted as counters, and the counter each feeds.
FINISHED = ("done", "failed", "canceled")
COUNTED_EVENTS = (*FINISHED, "retrying", "redelivered", "rerouted")
#: Reroute reasons, as the ``reason`` label names them.
REROUTE_REASONS = ("no_gpu_worker", "gpu_busy", "no_live_worker", "gpu_failure", "other")


def reroute_reason(detail: dict[str, Any]) -> str:
    """The ``reason`` label of a ``rerouted`` event: why the task left its queue, in one word.

    ``no_gpu_worker``: sent to CPU at submit, no GPU worker live; ``gpu_busy``:
    sent to CPU at submit, sooner done there; ``no_live_worker``: moved by the
    sweep from a queue with no live worker; ``gpu_failure``: moved to CPU by a
    GPU worker whose GPU failed; ``other``: anything else.
    """
    by, reason = str(detail.get("by") or ""), str(detail.get("reason") or "")
    if by == "submit":
        return "gpu_busy" if reason.startswith("GPU queue busy") else "no_gpu_worker"
    if by == "sweep":
        return "no_live_worker"
    if reason.startswith("GPU failed"):
        return "gpu_failure"
    return "other"


def drain_seconds(work_s: float, live: int) -> float:
    """Seconds until ``work_s`` seconds of work are done by ``live`` workers: 0 with no work,
    infinite with work and no worker."""
    if work_s <= 0:
        return 0.0
    if live <= 0:
        return math.inf
    return work_s / live


@dataclass
class QueueOverview:
    """One task queue now: RabbitMQ's counts, the store's tasks, the registry's workers.

    ``work_s`` is the expected processing time of the tasks queued and running
    on it (each at the measured median time per task of its live workers, else
    its routing estimate; a running one less its progress); ``drain_s`` that
    work shared among its live processes, None when none is live and work waits.
    Broker counts are None when RabbitMQ could not be asked; ``rates`` (messages
    per second, from the management API) are filled by whoever asks for them.
    """

    queue: str
    messages: int | None = None
    consumers: int | None = None
    delayed: int | None = None
    dead_letters: int | None = None
    queued_tasks: int = 0
    running_tasks: int = 0
    live_processes: int = 0
    live_workers: int = 0
    work_s: float = 0.0
    drain_s: float | None = 0.0
    down_since: float | None = None
    rates: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Snapshot:
    """Everything ``collect`` read: the metric families and the task queues' overview."""

    at: float
    families: list[Family]
    queues: dict[str, QueueOverview]
    broker_up: bool


def _json_text(dialect: str, column: Any, *path: str) -> ColumnElement:
    """A text field of a JSON column kept as text, on SQLite and PostgreSQL."""
    if dialect == "postgresql":
        return func.json_extract_path_text(cast(column, JSON), *path)
    return func.json_extract(column, "$." + ".".join(f'"{p}"' for p in path))


def _json_number(dialect: str, column: Any, *path: str) -> ColumnElement:
    return cast(_json_text(dialect, column, *path), Double)


#: One histogram series: (its labels, cumulative (bound, count) buckets, count, sum).
Series = tuple[dict[str, str], list[tuple[float, float]], float, float]


def add_series(into: dict[tuple[tuple[str, str], ...], Series], series: list[Series]) -> None:
    """Add each of ``series`` to the one of ``into`` with the same labels."""
    for labels, buckets, count, total in series:
        key = tuple(sorted(labels.items()))
        if key in into:
            _, had, had_count, had_total = into[key]
            buckets = [(bound, n + m) for (bound, n), (_, m) in zip(buckets, had, strict=True)]
            count, total = count + had_count, total + had_total
        into[key] = (labels, buckets, count, total)


class StoreFigures:
    """Reads the task figures from the server's database, in a few aggregate queries.

    Parameters:
      db: the server's database.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.queue = func.coalesce(_json_text(db.dialect, tasks.c.route, "queue"), "unknown")

    def task_counts(self) -> list[tuple[str, str, str, int]]:
        """(state, kind, queue, tasks) for every combination present."""
        query = select(tasks.c.state, tasks.c.kind, self.queue, func.count()).group_by(
            tasks.c.state, tasks.c.kind, self.queue
        )
        with self.db.read() as db:
            return sorted((r[0], r[1], r[2], int(r[3])) for r in db.execute(query))

    def histogram(
        self,
        value: ColumnElement,
        labels: dict[str, ColumnElement],
        where: Sequence[Any],
        bounds: Sequence[float],
    ) -> list[Series]:
        """(labels, cumulative buckets, count, sum) of ``value`` over the rows ``where`` selects.

        One scan: each row falls in the index of its first bucket (one CASE, evaluated
        once per row); the buckets are made cumulative here.
        """
        bucket = case(*[(value <= bound, i) for i, bound in enumerate(bounds)], else_=len(bounds))
        query = (
            select(*labels.values(), bucket, func.count(), func.sum(value))
            .where(*where, value.is_not(None))
            .group_by(*labels.values(), bucket)
        )
        with self.db.read() as db:
            rows = db.execute(query).all()
        n = len(labels)
        series: dict[tuple[str, ...], tuple[list[float], list[float]]] = {}
        for row in rows:
            key = tuple(str(v) for v in row[:n])
            counts, total = series.setdefault(key, ([0.0] * (len(bounds) + 1), [0.0]))
            counts[int(row[n])] += float(row[n + 1])
            total[0] += float(row[n + 2] or 0.0)
        found = []
        for key in sorted(series):
            counts, total = series[key]
            cumulative, running = [], 0.0
            for bound, count in zip(bounds, counts, strict=False):
                running += count
                cumulative.append((bound, running))
            found.append((dict(zip(labels, key, strict=True)), cumulative, float(sum(counts)), total[0]))
        return found

    def event_counts(self) -> tuple[Counter[str], Counter[tuple[str, str, str]]]:
        """Counted task events by name, and reroutes by (from, to, reason)."""
        detail = case((events.c.event == "rerouted", events.c.detail), else_=None)
        query = (
            select(events.c.event, detail, func.count())
            .where(events.c.event.in_(COUNTED_EVENTS))
            .group_by(events.c.event, detail)
        )
        counts: Counter[str] = Counter()
        reroutes: Counter[tuple[str, str, str]] = Counter()
        with self.db.read() as db:
            for event, text, n in db.execute(query):
                counts[event] += n
                if event == "rerouted":
                    moved = json.loads(text or "{}")
                    key = (str(moved.get("from") or "?"), str(moved.get("to") or "?"), reroute_reason(moved))
                    reroutes[key] += n
        return counts, reroutes

    def transferred_bytes(self, where: Sequence[Any] = ()) -> list[tuple[str, str, float]]:
        """(queue, direction, bytes) moved by done tasks (those ``where`` selects), as their workers
        reported."""
        dialect = self.db.dialect
        down = func.sum(_json_number(dialect, tasks.c.result, "transfer", "download_bytes"))
        up = func.sum(_json_number(dialect, tasks.c.result, "transfer", "upload_bytes"))
        query = select(self.queue, down, up).where(tasks.c.state == State.done, *where).group_by(self.queue)
        with self.db.read() as db:
            rows = db.execute(query).all()
        found = []
        for queue, down_bytes, up_bytes in rows:
            found.append((queue, "download", float(down_bytes or 0)))
            found.append((queue, "upload", float(up_bytes or 0)))
        return found

    def waiting_work(self, queue: str, per_task_s: float | None) -> tuple[int, int, float]:
        """(queued, running, seconds of work) of the tasks on ``queue``.

        Each task counts ``per_task_s`` where measured, else its routing
        estimate on that queue; a running one less the share its progress says is done.
        """
        dialect = self.db.dialect
        estimate = func.coalesce(_json_number(dialect, tasks.c.route, "estimates", f"{queue}_s"), 0.0)
        on_queue = self.queue == queue
        queued_q = select(func.count(), func.coalesce(func.sum(estimate), 0.0)).where(
            tasks.c.state == State.queued, on_queue
        )
        percent = func.coalesce(_json_number(dialect, tasks.c.progress, "percent"), 0.0)
        running_q = select(estimate, percent).where(tasks.c.state == State.running, on_queue)
        with self.db.read() as db:
            queued, queued_s = db.execute(queued_q).one()
            running = db.execute(running_q).all()
        work = queued * per_task_s if per_task_s else float(queued_s)
        for own, done_percent in running:
            left = max(0.0, 1.0 - float(done_percent) / 100.0)
            work += (per_task_s or float(own)) * left
        return int(queued), len(running), work


#: Seconds after a task's end before its figures join the totals kept in memory: far longer
#: than a transaction takes to commit, so that no task ends unseen behind the line.
SETTLE_S = 60.0


class EndedTotals:
    """The histograms and byte counters of ended tasks, each ended task read once.

    A task's wait, transfer and processing times and the bytes it moved do not
    change once it ended. Tasks that ended more than ``SETTLE_S`` ago are added
    to totals kept here, reading only those that ended since the last call (the
    ``tasks_finished`` index); those that ended since are read at every call,
    and so are the waits of running tasks. The first call reads every ended
    task, so the figures after a restart are the store's, and every replica
    shows the same. (A failed task retried from the dead letters counts its
    wait again when it ends again.)
    """

    def __init__(self) -> None:
        self.horizon: float | None = None
        self.sums: dict[str, dict[tuple[tuple[str, str], ...], Series]] = {}
        self.moved: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def read(
        self, figures: StoreFigures, now: float
    ) -> tuple[dict[str, list[Series]], Counter[tuple[str, str]]]:
        """The series of each histogram (wait, download, upload, processing), and bytes by
        (queue, direction)."""
        c = tasks.c
        with self._lock:
            line = now - SETTLE_S
            if self.horizon is None or line > self.horizon:
                window = [c.finished_at <= line]
                if self.horizon is not None:
                    window.append(c.finished_at > self.horizon)
                _add_ended(figures, window, self.sums, self.moved)
                self.horizon = line
            horizon = self.horizon
            sums = {name: dict(series) for name, series in self.sums.items()}
            moved = Counter(self.moved)
        _add_ended(figures, [c.finished_at > horizon], sums, moved)
        running = [c.state == State.running, c.started_at.is_not(None)]
        labels = {"queue_name": figures.queue, "kind": c.kind}
        waits = figures.histogram(c.started_at - c.created_at, labels, running, WAIT_BUCKETS)
        add_series(sums.setdefault("wait", {}), waits)
        return {name: [series[k] for k in sorted(series)] for name, series in sums.items()}, moved


def _add_ended(
    figures: StoreFigures,
    window: list[Any],
    sums: dict[str, dict[tuple[tuple[str, str], ...], Series]],
    moved: Counter[tuple[str, str]],
) -> None:
    """Add the figures of the ended tasks ``window`` selects to ``sums`` and ``moved``."""
    c = tasks.c
    dialect = figures.db.dialect
    labels = {"queue_name": figures.queue, "kind": c.kind}
    download = _json_number(dialect, c.result, "transfer", "download_s")
    upload = _json_number(dialect, c.result, "transfer", "upload_s")
    elapsed = c.finished_at - c.started_at - func.coalesce(download, 0.0) - func.coalesce(upload, 0.0)
    done = [*window, c.state == State.done]
    wanted = {
        "wait": (c.started_at - c.created_at, labels, [*window, c.started_at.is_not(None)], WAIT_BUCKETS),
        "download": (download, {"queue_name": figures.queue}, done, TRANSFER_BUCKETS),
        "upload": (upload, {"queue_name": figures.queue}, done, TRANSFER_BUCKETS),
        "processing": (case((elapsed < 0, 0.0), else_=elapsed), labels, [*done, c.started_at.is_not(None)],
                       PROCESSING_BUCKETS),
    }  # fmt: skip
    for name, (value, by, where, bounds) in wanted.items():
        add_series(sums.setdefault(name, {}), figures.histogram(value, by, where, bounds))
    for queue, direction, n in figures.transferred_bytes(window):
        moved[(queue, direction)] += n


def _task_families(figures: StoreFigures, totals: EndedTotals, now: float) -> list[Family]:
    by_state = Family(
        "morag_tasks", "gauge", "Tasks in the store by state, kind and the queue they are routed to."
    )
    for state, kind, queue, n in figures.task_counts():
        by_state.add(n, {"state": state, "kind": kind, "queue_name": queue})

    ended, bytes_moved = totals.read(figures, now)
    wait = Family(
        "morag_task_wait_seconds",
        "histogram",
        "Seconds from submit to the first start on a worker, of tasks started.",
    )
    for shown, buckets, count, total in ended.get("wait", []):
        wait.add_histogram(shown, buckets, count, total)
    transfer = Family(
        "morag_task_transfer_seconds",
        "histogram",
        "Seconds done tasks spent downloading their input and uploading their outputs, as workers timed it.",
    )
    for direction in ("download", "upload"):
        for shown, buckets, count, total in ended.get(direction, []):
            transfer.add_histogram({**shown, "direction": direction}, buckets, count, total)
    processing = Family(
        "morag_task_processing_seconds",
        "histogram",
        "Seconds from a done task's first start to its completion, less its transfers.",
    )
    for shown, buckets, count, total in ended.get("processing", []):
        processing.add_histogram(shown, buckets, count, total)

    counts, reroutes = figures.event_counts()
    finished = Family(
        "morag_tasks_finished_total", "counter", "Tasks that ended, by how (events in the store)."
    )
    for state in FINISHED:
        finished.add(counts[state], {"state": state})
    retries = Family(
        "morag_task_retries_total", "counter", "Retries workers reported (a failed attempt run again)."
    )
    retries.add(counts["retrying"])
    redeliveries = Family(
        "morag_task_redeliveries_total",
        "counter",
        "Task messages delivered again after their worker died or was lost.",
    )
    redeliveries.add(counts["redelivered"])
    rerouted = Family("morag_task_reroutes_total", "counter", "Tasks moved to another queue, by reason.")
    for (source, target, reason), n in sorted(reroutes.items()):
        rerouted.add(n, {"from_queue": source, "to_queue": target, "reason": reason})

    moved = Family(
        "morag_transfer_bytes_total",
        "counter",
        "Bytes done tasks moved over SFTP: input downloaded, outputs uploaded.",
    )
    for (queue, direction), n in sorted(bytes_moved.items()):
        moved.add(n, {"queue_name": queue, "direction": direction})
    return [by_state, wait, transfer, processing, finished, retries, redeliveries, rerouted, moved]


def _worker_families(records: list[WorkerRecord]) -> list[Family]:
    states = Family("morag_workers", "gauge", "Workers in the registry by capability and state.")
    counted: Counter[tuple[str, str]] = Counter((r.capability, r.state.value) for r in records)
    for capability in sorted({r.capability for r in records} | set(TASK_QUEUES)):
        for state in WorkerState:
            states.add(counted[(capability, state.value)], {"capability": capability, "state": state.value})
    processes = Family(
        "morag_worker_processes", "gauge", "Worker processes in the registry by capability and state."
    )
    by_process: Counter[tuple[str, str]] = Counter(
        (p.capability, p.state.value) for r in records for p in r.processes
    )
    for (capability, state), n in sorted(by_process.items()):
        processes.add(n, {"capability": capability, "state": state})
    heartbeat = Family(
        "morag_worker_last_heartbeat_timestamp_seconds",
        "gauge",
        "When each worker alive or stale last sent a heartbeat (Unix time).",
    )
    for record in records:
        if record.state in (WorkerState.alive, WorkerState.stale):
            labels = {"worker": record.id, "capability": record.capability, "state": record.state.value}
            heartbeat.add(record.last_seen, labels)
    return [states, processes, heartbeat]


def collect(
    settings: Settings,
    db: Database,
    registry: Registry,
    now: float | None = None,
    broker: bool = True,
    totals: EndedTotals | None = None,
) -> Snapshot:
    """Read every figure once. ``broker``: ask RabbitMQ too (left out, its metrics are absent);
    ``totals``: the ended tasks' figures kept from earlier calls (default: read them all)."""
    now = time.time() if now is None else now
    figures = StoreFigures(db)
    families = [Family("morag_build_info", "gauge", "The server's version.")]
    families[0].add(1, {"version": __version__})

    depths: dict[str, QueueDepth] = {}
    up = False
    if broker:
        try:
            depths = queue_depths(settings, QUEUES)
            up = True
        except Exception as exc:
            logger.warning("queue depths not read: RabbitMQ unreachable", extra={"error": str(exc)})
    broker_up = Family("morag_broker_up", "gauge", "Whether RabbitMQ answered this scrape (1) or not (0).")
    broker_up.add(1 if up else 0)
    families.append(broker_up)
    if depths:
        shown = {
            "morag_queue_messages": "Messages ready in the queue (RabbitMQ).",
            "morag_queue_consumers": "Consumers attached to the queue (RabbitMQ).",
            "morag_queue_delayed_messages": "Retries waiting for their backoff in the queue's delay queue.",
            "morag_queue_dead_letters": "Messages in the queue's dead letters (<queue>.XQ).",
        }
        attribute = dict(zip(shown, ("messages", "consumers", "delayed", "dead_letters"), strict=True))
        for name, help_text in shown.items():
            family = Family(name, "gauge", help_text)
            for queue, depth in depths.items():
                family.add(getattr(depth, attribute[name]), {"queue_name": queue})
            families.append(family)

    families += _task_families(figures, totals or EndedTotals(), now)
    records = registry.list(now)
    families += _worker_families(records)

    queues: dict[str, QueueOverview] = {}
    live = Family(
        "morag_queue_live_processes", "gauge", "Worker processes alive, not draining, consuming the queue."
    )
    live_workers = Family(
        "morag_queue_live_workers", "gauge", "Workers with a live process consuming the queue."
    )
    work = Family(
        "morag_queue_work_seconds",
        "gauge",
        "Expected processing seconds of the tasks queued and running on the queue.",
    )
    drain = Family(
        "morag_queue_drain_seconds",
        "gauge",
        "Expected seconds until the queue is empty with its live workers (+Inf: work waits, no live worker).",
    )
    for queue in TASK_QUEUES:
        view = registry.view(queue, now, records)
        queued, running, work_s = figures.waiting_work(queue, view.task_s)
        depth = depths.get(queue)
        overview = QueueOverview(
            queue=queue,
            messages=depth.messages if depth else None,
            consumers=depth.consumers if depth else None,
            delayed=depth.delayed if depth else None,
            dead_letters=depth.dead_letters if depth else None,
            queued_tasks=queued,
            running_tasks=running,
            live_processes=view.live,
            live_workers=view.workers,
            work_s=round(work_s, 1),
            down_since=view.down_since,
        )
        seconds = drain_seconds(work_s, view.live)
        overview.drain_s = None if math.isinf(seconds) else round(seconds, 1)
        queues[queue] = overview
        labels = {"queue_name": queue}
        live.add(view.live, labels)
        live_workers.add(view.workers, labels)
        work.add(work_s, labels)
        drain.add(seconds, labels)
    if "control" in depths:
        control = depths["control"]
        queues["control"] = QueueOverview(
            "control", control.messages, control.consumers, control.delayed, control.dead_letters
        )
    families += [live, live_workers, work, drain]
    return Snapshot(at=now, families=families, queues=queues, broker_up=up)
