"""Messages a worker sends the server on the ``control`` queue.

Workers need not import the control actors: a message names its actor, and
only the server consumes ``control``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
from dramatiq import Broker

from pipeline.identity import worker_id


class Reporter:
    """Sends task started, progress, completed, retrying and failed events.

    Progress is sent at most once per ``interval`` seconds per task, and
    whenever the stage changes.

    Parameters:
      broker: where to publish.
      interval: the least time between two progress reports of one task.
    """

    def __init__(self, broker: Broker, interval: float = 1.0) -> None:
        self.broker = broker
        self.interval = interval
        self._last: dict[str, tuple[float, str]] = {}
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def _send(self, actor_name: str, **kwargs: Any) -> None:
        kwargs.setdefault("worker", worker_id())
        kwargs["ts"] = time.time()
        message = dramatiq.Message(
            queue_name="control", actor_name=actor_name, args=(), kwargs=kwargs, options={}
        )
        self.broker.enqueue(message)

    def started(self, task_id: str, attempt: int) -> None:
        with self._lock:
            self._started[task_id] = time.monotonic()
        self._send("task_started", task_id=task_id, attempt=attempt)

    def progress(self, task_id: str, stage: str, percent: float) -> None:
        now = time.monotonic()
        with self._lock:
            last_time, last_stage = self._last.get(task_id, (0.0, ""))
            if stage == last_stage and now - last_time < self.interval:
                return
            self._last[task_id] = (now, stage)
            began = self._started.get(task_id, now)
        eta = None
        if 0 < percent < 100:
            eta = round((now - began) * (100 - percent) / percent, 1)
        self._send("task_progress", task_id=task_id, stage=stage, percent=round(percent, 1), eta_s=eta)

    def completed(self, task_id: str, outputs: list[dict[str, Any]], result: dict[str, Any]) -> None:
        self._forget(task_id)
        self._send("task_completed", task_id=task_id, outputs=outputs, result=result)

    def retrying(self, task_id: str, reason: str, attempts: int) -> None:
        self._forget(task_id)
        self._send("task_retrying", task_id=task_id, reason=reason, attempts=attempts)

    def failed(self, task_id: str, reason: str, attempts: int) -> None:
        self._forget(task_id)
        self._send("task_failed", task_id=task_id, reason=reason, attempts=attempts)

    def _forget(self, task_id: str) -> None:
        with self._lock:
            self._last.pop(task_id, None)
            self._started.pop(task_id, None)


_reporters: dict[int, Reporter] = {}


def reporter_for(broker: Broker) -> Reporter:
    """The one Reporter of this process for ``broker``."""
    from pipeline.config import get_settings

    key = id(broker)
    if key not in _reporters:
        _reporters[key] = Reporter(broker, get_settings().progress_interval_s)
    return _reporters[key]
