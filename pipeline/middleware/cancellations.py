"""Cancellation on workers: skip canceled tasks, let running ones stop."""

from __future__ import annotations

import threading
import time

from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import SkipMessage

from pipeline.brokers.cancellations import CancelListener
from pipeline.logs import get_logger
from pipeline.reporting import reporter_for
from pipeline.task_message import task_id_of

logger = get_logger(__name__)

_canceled: set[str] = set()
_lock = threading.Lock()


def cancel(task_id: str) -> None:
    """Record in this process that ``task_id`` was canceled."""
    with _lock:
        _canceled.add(task_id)


def is_canceled(task_id: str) -> bool:
    """Whether this process has heard that ``task_id`` was canceled (polled by running jobs)."""
    with _lock:
        return task_id in _canceled


class Cancellations(Middleware):
    """Keeps this worker process's set of canceled tasks and skips their messages.

    At worker boot a thread starts reading the cancellation stream
    (``pipeline.brokers.cancellations``). No task message runs before that
    thread has read the notices kept so far, up to ``catch_up_s`` after boot:
    the first task messages wait for it, while the rest of the worker boots
    (the stream tells its end only by falling silent for half a second, which
    the worker's boot no longer waits out). A message whose task is canceled
    is acknowledged without running, and the server hears that it was
    skipped. A running job polls ``is_canceled`` and stops
    (``pipeline.jobs``). Only task messages are checked (they name a task);
    only workers of task queues listen: the server's ``control`` consumer
    does not.

    Parameters:
      catch_up_s: how long after boot task messages wait for the notices kept so far.
    """

    def __init__(self, catch_up_s: float = 10.0) -> None:
        self.catch_up_s = catch_up_s
        self.listener: CancelListener | None = None
        self._caught_up_by = 0.0  # time.monotonic() past which task messages wait no more
        self._behind_warned = False

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        queues = worker.consumer_whitelist or broker.get_declared_queues()
        if not isinstance(broker, RabbitmqBroker) or not set(queues) - {"control"}:
            return
        self.listener = CancelListener(broker.parameters, cancel)
        self._caught_up_by = time.monotonic() + self.catch_up_s
        self._behind_warned = False
        self.listener.start()

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        if self.listener is not None:
            self.listener.stop()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        task_id = task_id_of(message) if message.queue_name != "control" else None
        if not task_id:
            return  # names no task: nothing can cancel it
        self._wait_for_notices()
        if is_canceled(task_id):
            logger.info("canceled task skipped", extra={"task_id": task_id})
            reporter_for(broker).note(task_id, "skipped", {"reason": "canceled before a worker started it"})
            raise SkipMessage(f"task {task_id} was canceled")

    def _wait_for_notices(self) -> None:
        """Until the listener has read the notices kept so far, or ``catch_up_s`` after boot."""
        listener = self.listener
        if listener is None or listener.caught_up.is_set():
            return
        caught_up = listener.caught_up.wait(max(0.0, self._caught_up_by - time.monotonic()))
        if not caught_up and not self._behind_warned:
            self._behind_warned = True
            logger.warning("cancellation notices not read yet; continuing without them")
