"""Cancellation on workers: skip canceled tasks, let running ones stop."""

from __future__ import annotations

import threading

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
    (``pipeline.brokers.cancellations``); the worker waits, up to
    ``catch_up_s``, until it has read the notices kept so far. A message
    whose task is canceled is acknowledged without running, and the server
    hears that it was skipped. A running job polls ``is_canceled`` and stops
    (``pipeline.jobs``). Only workers of task queues listen: the server's
    ``control`` consumer does not.

    Parameters:
      catch_up_s: how long a booting worker waits for the notices kept so far.
    """

    def __init__(self, catch_up_s: float = 10.0) -> None:
        self.catch_up_s = catch_up_s
        self.listener: CancelListener | None = None

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        queues = worker.consumer_whitelist or broker.get_declared_queues()
        if not isinstance(broker, RabbitmqBroker) or not set(queues) - {"control"}:
            return
        self.listener = CancelListener(broker.parameters, cancel)
        self.listener.start()
        if not self.listener.caught_up.wait(self.catch_up_s):
            logger.warning("cancellation notices not read yet; continuing without them")

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        if self.listener is not None:
            self.listener.stop()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        task_id = task_id_of(message) if message.queue_name != "control" else None
        if task_id and is_canceled(task_id):
            logger.info("canceled task skipped", extra={"task_id": task_id})
            reporter_for(broker).note(task_id, "skipped", {"reason": "canceled before a worker started it"})
            raise SkipMessage(f"task {task_id} was canceled")
