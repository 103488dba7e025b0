"""The reconciler: every task that is not final gets an end.

It runs with every liveness sweep, in the server's liveness process, and looks
for three gaps no message will ever close:

- a task recorded but never published (the server died between the two, or
  the broker stayed away longer than ``MORAG_PUBLISH_WAIT_S``): its message is
  published now;
- a task ``running`` that no report has touched for ``MORAG_TASK_LOST_AFTER_S``
  and that no live worker holds (its worker is gone and its message with it,
  or its outcome was dropped): it is queued and delivered again, at most
  ``MORAG_MAX_DELIVERIES`` messages in all, then failed with the reason;
- a task ``queued`` whose message is in no queue (an operator purged the
  queue, or the broker lost it): when the management API shows the task's
  queue, its delay queue and ``control`` holding no message at all (ready or
  unacknowledged) on two passes at least ``MORAG_VANISHED_AFTER_S`` apart, and
  the task is untouched meanwhile, it is delivered again, under the same bound.
  A queue that still holds messages hides nothing: the check needs it empty.
  It needs RabbitMQ's management API; without it the check is skipped and logged.

A task whose message still waits in a queue is delivered twice at worst:
outcomes are idempotent (a second completion is a no-op), so nothing is
doubled. Every action is an event on the task and an audit line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from dramatiq import Broker
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import dq_name

from pipeline import chunks
from pipeline.brokers.management import Management
from pipeline.fleet.registry import TASK_QUEUES, Registry, WorkerState
from pipeline.logs import get_logger
from pipeline.security.audit import audit
from pipeline.services import Services
from pipeline.store import Task
from pipeline.submission import deliver

logger = get_logger(__name__)


@dataclass
class ReconcileReport:
    """What one pass did, by task id."""

    published: list[str] = field(default_factory=list)
    redelivered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"published": self.published, "redelivered": self.redelivered, "failed": self.failed}


class Reconciler:
    """Publishes what was never published and delivers again what was lost.

    Parameters:
      services: the server's stores and settings.
      registry: the worker registry (which live worker holds which task).
      broker: where task messages are published.
    """

    def __init__(self, services: Services, registry: Registry, broker: Broker) -> None:
        self.services = services
        self.registry = registry
        self.broker = broker
        #: Queued tasks seen with no message anywhere, by id: (when first seen, their updated_at then).
        self._missing: dict[str, tuple[float, float]] = {}

    def run(self, now: float | None = None) -> ReconcileReport:
        now = time.time() if now is None else now
        settings, store = self.services.settings, self.services.store
        report = ReconcileReport()
        # Leave a submit that is still trying its broker alone.
        for task in store.unpublished(created_before=now - settings.publish_wait_s - 5):
            if deliver(self.services, self.broker, task, by="reconciler", wait_s=0):
                report.published.append(task.id)
                audit("task.published", task=task.id, queue=task.route["queue"], by="reconciler")
        held = {
            task_id
            for worker in self.registry.list(now)
            for process in worker.processes
            if process.state is WorkerState.alive
            for task_id in process.current
        }
        for task in store.silent_running(updated_before=now - settings.task_lost_after_s):
            if chunks.chunks_of(task):
                # A long recording waits on its chunks, each delivered again alone if lost;
                # one whose chunks all ended while the server was away is settled here.
                chunks.settle(self.services, task)
            elif task.id not in held:
                self._lost(task, now, report)
        self._vanished(now, report)
        if report.published or report.redelivered or report.failed:
            logger.info("reconciled", extra=report.summary())
        return report

    def _vanished(self, now: float, report: ReconcileReport) -> None:
        """Deliver again the queued tasks whose queue has held no message for two passes."""
        settings, store = self.services.settings, self.services.store
        bound = settings.vanished_after_s
        waiting = store.waiting(updated_before=now - bound) if isinstance(self.broker, RabbitmqBroker) else []
        if not waiting:
            self._missing.clear()
            return
        try:
            with Management(settings) as api:
                held = {q["name"]: q.get("messages") for q in api.queues(columns="name,messages")}
        except httpx.HTTPError as exc:
            logger.warning("vanished messages not checked: no management API", extra={"error": str(exc)})
            return
        empty = {
            queue
            for queue in TASK_QUEUES
            if all(held.get(name, 0) == 0 for name in (queue, dq_name(queue), "control"))
        }
        missing: dict[str, tuple[float, float]] = {}
        for task in waiting:
            queue = task.route.get("queue")
            if queue not in empty:
                continue
            first, seen_updated = self._missing.get(task.id, (now, task.updated_at))
            if seen_updated != task.updated_at:
                first = now
            if now - first < bound or store.get(task.id, events=False).updated_at != task.updated_at:
                missing[task.id] = (first, task.updated_at)
                continue
            reason = (
                f"queued, but its message is in no queue ({queue} and {dq_name(queue)} empty for"
                f" {round(now - first)}s, MORAG_VANISHED_AFTER_S={bound:g})"
            )
            self._again(task, reason, report)
        self._missing = missing

    def _lost(self, task: Task, now: float, report: ReconcileReport) -> None:
        silent, bound = round(now - task.updated_at), self.services.settings.task_lost_after_s
        reason = (
            f"running on {task.worker or 'a worker'} with no report for {silent}s"
            f" (MORAG_TASK_LOST_AFTER_S={bound:g}) and no live worker holds it"
        )
        self._again(task, reason, report)

    def _again(self, task: Task, reason: str, report: ReconcileReport) -> None:
        outcome = deliver_again(self.services, self.broker, task, reason)
        if outcome == "redelivered":
            report.redelivered.append(task.id)
        elif outcome == "failed":
            report.failed.append(task.id)


def deliver_again(services: Services, broker: Broker, task: Task, reason: str, by: str = "reconciler") -> str:
    """Queue a task whose run was lost and publish it again, or fail it once it had
    ``MORAG_MAX_DELIVERIES`` messages; returns ``redelivered``, ``failed`` or ``ended``
    (it had ended meanwhile).
    """
    store, limit = services.store, services.settings.max_deliveries
    if task.deliveries >= limit:
        reason += f"; failed after {task.deliveries} deliveries (MORAG_MAX_DELIVERIES={limit})"
        if not store.mark_failed(task.id, reason, None):
            return "ended"
        audit("task.failed", task=task.id, reason=reason, by=by)
        return "failed"
    if not store.requeue(task.id, {"reason": reason + "; delivered again", "by": by}, unpublished=True):
        return "ended"
    audit("task.redelivered", task=task.id, reason=reason, by=by)
    deliver(services, broker, store.get(task.id, events=False), by=by, wait_s=0)
    return "redelivered"
