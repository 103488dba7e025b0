"""The monitoring history: how each task queue stood over time, kept in the server's database.

Every sweep (each minute, ``MORAG_SWEEP_CRON``, and on ``POST
/api/v1/workers/sweep``) writes one sample per task queue to the
``monitor_samples`` table: messages waiting, consumers, dead letters, live
worker processes, and how many of the queue's tasks ended ``done`` or
``failed`` since the sample before. The dashboard draws its charts from
these rows (throughput, queue depth, GPU versus CPU share), so a restarted
server shows the history it had. A sample costs one connection to RabbitMQ
(passive declares) and three small reads of the store; samples older than
``KEEP_S`` are deleted as new ones are written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, ColumnElement, Connection, cast, delete, func, select, type_coerce

from pipeline.config import Settings
from pipeline.db import Database
from pipeline.logs import get_logger
from pipeline.schema import monitor_samples, tasks

logger = get_logger(__name__)

#: Samples older than this are deleted (two weeks of one-minute samples: about 40,000 rows).
KEEP_S = 14 * 24 * 3600.0
#: The task queues sampled.
SAMPLED_QUEUES = ("gpu", "cpu")
#: The most points a series read returns; older samples are merged into wider buckets.
MAX_POINTS = 240


def route_field(dialect: str, key: str) -> ColumnElement[str]:
    """SQL for one text field of a task's ``route`` (stored as JSON text), for ``dialect``."""
    if dialect == "postgresql":
        return cast(tasks.c.route, JSON)[key].as_string()
    return type_coerce(tasks.c.route, JSON)[key].as_string()


def ended_by_queue(db: Connection, dialect: str, since: float, until: float) -> dict[str, dict[str, int]]:
    """Tasks that ended ``done`` or ``failed`` in ``(since, until]``, by the queue their route names."""
    queue = route_field(dialect, "queue")
    # Only the range on finished_at: a condition on state would lead the planner to the state
    # index, which holds every done task; canceled tasks are dropped here instead.
    query = (
        select(queue, tasks.c.state, func.count())
        .where(tasks.c.finished_at > since, tasks.c.finished_at <= until)
        .group_by(queue, tasks.c.state)
    )
    found: dict[str, dict[str, int]] = {}
    for name, state, count in db.execute(query):
        if state in ("done", "failed"):
            found.setdefault(name or "?", {"done": 0, "failed": 0})[state] = int(count)
    return found


class History:
    """The ``monitor_samples`` table: writing a sample, reading series.

    Parameters:
      target: the settings, SQLite file or database URL of the server's database.
      keep_s: how long samples are kept.
    """

    def __init__(self, target: Settings | str | Path, keep_s: float = KEEP_S) -> None:
        self.db = Database(target)
        self.keep_s = keep_s

    def last_at(self) -> float | None:
        """When the newest sample was taken; None when there is none."""
        with self.db.read() as db:
            return db.execute(select(func.max(monitor_samples.c.ts))).scalar()

    def record(
        self, queues: dict[str, dict[str, Any]], now: float | None = None, first_interval_s: float = 60.0
    ) -> dict[str, dict[str, Any]]:
        """Write one sample of each queue in ``queues`` and return the rows written.

        ``queues`` maps a queue to what was seen of it: ``messages``,
        ``consumers``, ``dead`` (None where RabbitMQ could not be asked) and
        ``live``. The tasks that ended since the last sample (or in the
        ``first_interval_s`` before the first) are counted here.
        """
        now = time.time() if now is None else now
        rows: dict[str, dict[str, Any]] = {}
        with self.db.transaction() as db:
            last = db.execute(select(func.max(monitor_samples.c.ts))).scalar()
            since = last if last is not None and last < now else now - first_interval_s
            ended = ended_by_queue(db, self.db.dialect, since, now)
            for queue, seen in queues.items():
                counts = ended.get(queue, {})
                row = {
                    "ts": now,
                    "queue": queue,
                    "interval_s": round(now - since, 3),
                    "messages": seen.get("messages"),
                    "consumers": seen.get("consumers"),
                    "dead": seen.get("dead"),
                    "live": int(seen.get("live") or 0),
                    "done": counts.get("done", 0),
                    "failed": counts.get("failed", 0),
                }
                db.execute(self.db.insert(monitor_samples).values(**row).on_conflict_do_nothing())
                rows[queue] = row
            db.execute(delete(monitor_samples).where(monitor_samples.c.ts < now - self.keep_s))
        return rows

    def series(
        self, since: float, until: float | None = None, max_points: int = MAX_POINTS
    ) -> list[dict[str, Any]]:
        """Samples taken in ``[since, until]``, oldest first, one point per time with every queue.

        Each point: ``ts``, ``interval_s``, and per queue its ``messages``,
        ``dead``, ``live``, ``done`` and ``failed``. When there are more than
        ``max_points`` samples, neighbours are merged: depths averaged, ended
        tasks and intervals summed, so throughput stays right.
        """
        until = time.time() if until is None else until
        query = (
            select(monitor_samples)
            .where(monitor_samples.c.ts >= since, monitor_samples.c.ts <= until)
            .order_by(monitor_samples.c.ts)
        )
        points: dict[float, dict[str, Any]] = {}
        with self.db.read() as db:
            for row in db.execute(query):
                point = points.setdefault(row.ts, {"ts": row.ts, "interval_s": row.interval_s, "queues": {}})
                point["queues"][row.queue] = {
                    "messages": row.messages,
                    "consumers": row.consumers,
                    "dead": row.dead,
                    "live": row.live,
                    "done": row.done,
                    "failed": row.failed,
                }
        ordered = list(points.values())
        if len(ordered) <= max_points:
            return ordered
        size = -(-len(ordered) // max_points)
        return [_merge(ordered[i : i + size]) for i in range(0, len(ordered), size)]


def _merge(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Neighbouring points as one: at the last one's time, depths averaged, counts summed."""
    queues: dict[str, dict[str, Any]] = {}
    for name in {q for p in points for q in p["queues"]}:
        values = [p["queues"][name] for p in points if name in p["queues"]]
        merged: dict[str, Any] = {}
        for field in ("messages", "consumers", "dead", "live"):
            known = [v[field] for v in values if v[field] is not None]
            merged[field] = round(sum(known) / len(known), 1) if known else None
        for field in ("done", "failed"):
            merged[field] = sum(v[field] for v in values)
        queues[name] = merged
    return {"ts": points[-1]["ts"], "interval_s": sum(p["interval_s"] for p in points), "queues": queues}


def take_sample(settings: Settings, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Sample every task queue now (RabbitMQ's counts, the registry's live processes) and record it.

    RabbitMQ that cannot be asked leaves the depths empty; the sample is written all the same.
    """
    from pipeline.brokers.rabbitmq import queue_stats
    from pipeline.fleet.registry import get_registry

    now = time.time() if now is None else now
    seen: dict[str, dict[str, Any]] = {queue: {} for queue in SAMPLED_QUEUES}
    try:
        stats = queue_stats(settings, SAMPLED_QUEUES)
        for queue in SAMPLED_QUEUES:
            seen[queue].update(
                messages=stats[queue]["messages"],
                consumers=stats[queue]["consumers"],
                dead=stats[f"{queue}.XQ"]["messages"],
            )
    except Exception as exc:
        logger.warning("history sample without queue depths: RabbitMQ unreachable", extra={"error": str(exc)})
    for queue, view in get_registry(settings).views(now).items():
        if queue in seen:
            seen[queue]["live"] = view.live
    return History(settings).record(seen, now)
