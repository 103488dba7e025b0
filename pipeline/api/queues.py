"""The queues over HTTP: ``GET /api/v1/queues``, how each stands and how long it will take to drain.

RabbitMQ's management API gives each queue's depth (ready and unacknowledged),
consumers and message rates; when it cannot be asked, passive declares give
the depth and consumers alone. RabbitMQ does not count a priority queue's
messages by priority, so the waiting tasks by priority come from the store
(queued tasks, by the queue and priority of their route).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
from dramatiq import Broker
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from fastapi import APIRouter
from sqlalchemy import func, select

from pipeline.api.auth import Access
from pipeline.brokers import QUEUES
from pipeline.brokers.management import Management
from pipeline.brokers.rabbitmq import queue_stats
from pipeline.config import Settings
from pipeline.db import Database, database_target
from pipeline.fleet.registry import TASK_QUEUES, QueueView, Registry, WorkerRecord, get_registry
from pipeline.history import route_field
from pipeline.logs import get_logger
from pipeline.metrics import EndedTotals, collect
from pipeline.schema import tasks
from pipeline.services import Services
from pipeline.store import State, TaskStore

logger = get_logger(__name__)

#: How long one answer of RabbitMQ serves every reader (dashboards poll every few seconds).
BROKER_TTL_S = 2.0


class BrokerQueues:
    """What RabbitMQ says of the pipeline's queues, asked at most once per ``ttl`` seconds.

    Parameters:
      settings: the broker URL (its vhost and credentials) and the management API's URL.
      ttl: how long an answer is reused.
    """

    def __init__(self, settings: Settings, ttl: float = BROKER_TTL_S) -> None:
        self.settings = settings
        self.ttl = ttl
        self._lock = threading.Lock()
        self._answer: tuple[float, dict[str, Any]] | None = None

    def read(self) -> dict[str, Any]:
        """``{"source", "error", "queues": {name: {...}}}``; ``source``: ``management``, ``amqp`` or None."""
        with self._lock:
            now = time.monotonic()
            if self._answer is None or now - self._answer[0] > self.ttl:
                self._answer = (now, self._ask())
            return self._answer[1]

    def _ask(self) -> dict[str, Any]:
        try:
            return {"source": "management", "error": None, "queues": self._management()}
        except (httpx.HTTPError, ValueError) as exc:
            error = f"management API: {exc or type(exc).__name__}"
        try:
            stats = queue_stats(self.settings, QUEUES)
        except Exception as exc:
            return {"source": None, "error": f"{error}; AMQP: {exc or type(exc).__name__}", "queues": {}}
        found = {
            name: {"messages": stat["messages"], "ready": stat["messages"], "unacked": None,
                   "consumers": stat["consumers"], "publish_rate": None, "deliver_rate": None,
                   "ack_rate": None}
            for name, stat in stats.items()
        }  # fmt: skip
        return {"source": "amqp", "error": error, "queues": found}

    def _management(self) -> dict[str, dict[str, Any]]:
        columns = "name,messages,messages_ready,messages_unacknowledged,consumers,message_stats"
        with Management(self.settings) as api:
            listed = api.queues(columns)
        found = {}
        for info in listed:
            stats = info.get("message_stats") or {}
            found[str(info.get("name"))] = {
                "messages": info.get("messages", 0),
                "ready": info.get("messages_ready", 0),
                "unacked": info.get("messages_unacknowledged", 0),
                "consumers": info.get("consumers", 0),
                "publish_rate": _rate(stats, "publish"),
                "deliver_rate": _rate(stats, "deliver_get"),
                "ack_rate": _rate(stats, "ack"),
            }
        return found


def _rate(stats: dict[str, Any], name: str) -> float:
    return round(float((stats.get(f"{name}_details") or {}).get("rate") or 0.0), 3)


def waiting_by_priority(store: TaskStore) -> dict[str, dict[str, int]]:
    """Queued tasks by the queue and the priority their route names (``{"gpu": {"high": 2}}``)."""
    dialect = store.db.dialect
    queue, priority = route_field(dialect, "queue"), route_field(dialect, "priority")
    query = (
        select(queue, priority, func.count()).where(tasks.c.state == State.queued).group_by(queue, priority)
    )
    found: dict[str, dict[str, int]] = {}
    with store.db.read() as db:
        for name, level, count in db.execute(query):
            found.setdefault(name or "?", {})[level or "?"] = int(count)
    return found


def drain_estimate(
    waiting: int | None, ack_rate: float | None, view: QueueView | None
) -> tuple[float | None, str]:
    """Seconds until ``waiting`` messages are done, and how that was worked out.

    RabbitMQ's acknowledgement rate where it is measured; else the live
    processes' median time per task; None when neither exists (no live worker).
    """
    if not waiting:
        return 0.0, "empty"
    if ack_rate:
        return round(waiting / ack_rate, 1), "acknowledgement rate"
    if view is not None and view.live and view.task_s:
        return round(waiting * view.task_s / view.live, 1), "median task time of live workers"
    if view is not None and not view.live:
        return None, "no live worker"
    return None, "no speed measured yet"


def queue_overview(
    services: Services,
    broker: BrokerQueues,
    registry: Registry,
    now: float,
    records: list[WorkerRecord] | None = None,
) -> dict[str, Any]:
    """Every queue: depth, consumers, rates, dead letters, waiting by priority, live workers, drain time.

    ``records`` is ``registry.list(now)`` where the caller has it already.
    """
    seen = broker.read()
    records = registry.list(now) if records is None else records
    views = {queue: registry.view(queue, now, records) for queue in TASK_QUEUES}
    by_priority = waiting_by_priority(services.store)
    queues = []
    for name in QUEUES:
        info = seen["queues"].get(name, {})
        dead = seen["queues"].get(f"{name}.XQ", {}).get("messages")
        delayed = seen["queues"].get(f"{name}.DQ", {}).get("messages")
        view = views.get(name)
        drain_s, drain_how = drain_estimate(info.get("messages"), info.get("ack_rate"), view)
        queues.append({
            "name": name,
            **{k: info.get(k) for k in ("messages", "ready", "unacked", "consumers", "publish_rate",
                                        "deliver_rate", "ack_rate")},
            "dead": dead,
            "delayed": delayed,
            "waiting_by_priority": by_priority.get(name, {}),
            "live_processes": view.live if view else None,
            "live_workers": view.workers if view else None,
            "task_s": view.task_s if view else None,
            "down_since": view.down_since if view else None,
            "drain_s": drain_s,
            "drain": drain_how,
        })  # fmt: skip
    return {"source": seen["source"], "error": seen["error"], "queues": queues}


def queues_router(services: Services, broker: Broker, access: Access) -> APIRouter:
    """``GET /api/v1/queues`` (``access.read``): the figures ``/metrics`` exports, per queue."""
    router = APIRouter(prefix="/api/v1/queues", tags=["queues"])
    settings = services.settings
    rabbitmq = isinstance(broker, RabbitmqBroker)
    db = Database(database_target(settings))
    registry = get_registry(settings)
    totals = EndedTotals()

    @router.get("", dependencies=access.read)
    def list_queues(rates: bool = True) -> dict[str, Any]:
        """Each task queue: depth, consumers, delayed retries, dead letters, tasks queued and running,
        live workers, the work waiting and the expected time to drain it; with ``rates``, the
        publish, deliver and ack rates of RabbitMQ's management API (null where it cannot be asked)."""
        snapshot = collect(settings, db, registry, broker=rabbitmq, totals=totals)
        if rates and rabbitmq:
            try:
                with Management(settings) as api:
                    found = api.rates(list(snapshot.queues))
                for name, overview in snapshot.queues.items():
                    overview.rates = found.get(name, {})
            except Exception as exc:
                logger.info("queue rates not read: management API unreachable", extra={"error": str(exc)})
        return {
            "at": snapshot.at,
            "broker_up": snapshot.broker_up,
            "queues": {name: overview.to_dict() for name, overview in snapshot.queues.items()},
        }

    return router
