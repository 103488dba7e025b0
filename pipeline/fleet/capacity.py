"""What submit knows of the workers: live GPU workers and each task queue's load."""

from __future__ import annotations

import threading
import time

from pipeline.brokers.rabbitmq import queue_stats
from pipeline.config import Settings
from pipeline.fleet.registry import TASK_QUEUES, Registry
from pipeline.logs import get_logger
from pipeline.routing import Capacity, QueueLoad

logger = get_logger(__name__)


class CapacityProbe:
    """What submit knows of the workers: live GPU workers and each task queue's load.

    The registry counts live workers and their measured speed; RabbitMQ's
    consumer counts and queue depths come from passive declares, asked at
    most every ``ttl`` seconds. A queue with no consumer has no live worker
    whatever the heartbeats said; a queue whose workers never sent a
    heartbeat is judged by its consumer count alone.

    Parameters:
      settings: where RabbitMQ is.
      registry: the worker registry.
      ttl: seconds RabbitMQ's answer is reused.
    """

    def __init__(self, settings: Settings, registry: Registry, ttl: float = 2.0) -> None:
        self.settings = settings
        self.registry = registry
        self.ttl = ttl
        self._stats: dict[str, dict[str, int]] | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def _queue_stats(self) -> dict[str, dict[str, int]] | None:
        with self._lock:
            if time.monotonic() - self._at > self.ttl:
                try:
                    self._stats = queue_stats(self.settings, TASK_QUEUES)
                except Exception as exc:
                    logger.warning("cannot read queue stats", extra={"error": str(exc)})
                    self._stats = None
                self._at = time.monotonic()
            return self._stats

    def __call__(self) -> Capacity:
        stats = self._queue_stats()
        views = self.registry.views()
        loads: dict[str, QueueLoad | None] = {}
        counts: dict[str, int | None] = {}
        for queue in TASK_QUEUES:
            view = views[queue]
            consumers = stats[queue]["consumers"] if stats else None
            if consumers == 0:
                count: int | None = 0
            elif view.known:
                count = view.live
            else:
                count = consumers
            counts[queue] = count
            loads[queue] = None
            if stats is not None and count is not None:
                loads[queue] = QueueLoad(
                    workers=count,
                    waiting=stats[queue]["messages"] + view.in_flight,
                    realtime_factor=view.realtime_factor,
                    task_s=view.task_s,
                )
        return Capacity(gpu_workers=counts["gpu"], gpu=loads["gpu"], cpu=loads["cpu"])
