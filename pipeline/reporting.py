"""Messages a worker sends the server on the ``control`` queue.

Workers need not import the control actors: a message names its actor, and
only the server consumes ``control``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from dramatiq import Broker
from dramatiq.errors import BrokerConnectionError

from pipeline import control
from pipeline.logs import get_logger

logger = get_logger(__name__)


class Reporter:
    """Sends task started, progress, completed, retrying and failed events.

    Progress is sent at most once per ``interval`` seconds per task, and
    whenever the stage changes.

    While RabbitMQ is away (a restart, a cut connection) progress, start and
    notes are dropped; a completion, failure or retry is sent again with
    backoff for up to ``persist`` seconds. A completion that still cannot be
    sent raises, so its message is not acknowledged and comes back; the
    manifest then spares the work.

    Parameters:
      broker: where to publish.
      interval: the least time between two progress reports of one task.
      persist: how long an outcome is tried before giving up.
    """

    def __init__(self, broker: Broker, interval: float = 1.0, persist: float = 120.0) -> None:
        self.broker = broker
        self.interval = interval
        self.persist = persist
        self._last: dict[str, tuple[float, str]] = {}
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def _send(self, actor_name: str, *, outcome: bool = False, **kwargs: Any) -> None:
        message = control.report(actor_name, **kwargs)
        deadline = time.monotonic() + (self.persist if outcome else 0.0)
        pause = 0.5
        while True:
            try:
                self.broker.enqueue(message)
                return
            except BrokerConnectionError as exc:
                if time.monotonic() + pause > deadline:
                    if outcome:
                        raise
                    logger.warning(
                        "report not sent: broker unreachable",
                        extra={"task_id": kwargs.get("task_id"), "event": actor_name, "error": str(exc)},
                    )
                    return
            time.sleep(pause)
            pause = min(pause * 2, 10.0)

    def started(self, task_id: str, attempt: int) -> None:
        with self._lock:
            self._started[task_id] = time.monotonic()
        self._send(control.TASK_STARTED, task_id=task_id, attempt=attempt)

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
        self._send(control.TASK_PROGRESS, task_id=task_id, stage=stage, percent=round(percent, 1), eta_s=eta)

    def completed(self, task_id: str, outputs: list[dict[str, Any]], result: dict[str, Any]) -> None:
        self._forget(task_id)
        self._send(control.TASK_COMPLETED, outcome=True, task_id=task_id, outputs=outputs, result=result)

    def retrying(self, task_id: str, reason: str, attempts: int) -> None:
        self._forget(task_id)
        self._send_quietly(control.TASK_RETRYING, task_id=task_id, reason=reason, attempts=attempts)

    def failed(self, task_id: str, reason: str, attempts: int) -> None:
        self._forget(task_id)
        self._send_quietly(control.TASK_FAILED, task_id=task_id, reason=reason, attempts=attempts)

    def rerouted(self, task_id: str, source: str, target: str, reason: str) -> None:
        """This worker moved the task's message to ``target``: sent like an outcome, since the
        server opens the task's files to ``target``'s workers once it has recorded the move."""
        self._send_quietly(
            control.TASK_REROUTED, task_id=task_id, source=source, target=target, reason=reason
        )

    def note(self, task_id: str, event: str, detail: dict[str, Any]) -> None:
        """An event for the task's history: redelivered, skipped, stopped, reused."""
        self._forget(task_id)
        self._send(control.TASK_NOTE, task_id=task_id, event=event, detail=detail)

    def _send_quietly(self, actor_name: str, **kwargs: Any) -> None:
        """An outcome sent from middleware, which must not raise: logged when it cannot be sent."""
        try:
            self._send(actor_name, outcome=True, **kwargs)
        except BrokerConnectionError as exc:
            logger.error(
                "outcome not sent: broker unreachable",
                extra={"task_id": kwargs.get("task_id"), "event": actor_name, "error": str(exc)},
            )

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
