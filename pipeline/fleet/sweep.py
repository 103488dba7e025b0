"""What the server does with the worker registry: the sweep, and the capacity view for routing.

The sweep (``Sweeper.sweep``, run by a periodiq actor every minute and
callable directly):

1. asks RabbitMQ how many consumers each task queue has;
2. writes every worker's change of state (alive -> stale -> dead, or dead at
   once when its queue has no consumer left), noting it on the tasks the
   worker held;
3. for a queue that has had no live worker for ``reroute_after`` seconds,
   while the other queue has one, moves its waiting fallback-eligible
   messages there (``gpu`` -> ``cpu``: tasks that prefer the GPU; ``cpu`` ->
   ``gpu``: transcriptions that prefer it). Tasks that require the GPU never
   move; once they have waited ``gpu_max_wait`` seconds with no GPU worker
   they fail with that reason and go to the dead letters. Delayed messages
   (``<queue>.DQ``, retries waiting for their backoff) move with their queue.

Every move is recorded on its task with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import pika
from dramatiq.common import dq_name, q_name, xq_name

from pipeline.brokers.move import Action, Decision, MoveReport, move_messages
from pipeline.brokers.rabbitmq import connection_parameters, queue_stats
from pipeline.config import Settings
from pipeline.errors import TaskNotFound
from pipeline.fleet.registry import TASK_QUEUES, QueueView, Registry, Transition, WorkerState
from pipeline.kinds import actors_on
from pipeline.logs import get_logger
from pipeline.routing import fit_job
from pipeline.security.audit import audit
from pipeline.store import FINAL_STATES, TaskStore
from pipeline.task_message import gpu_preference, job_of, moved

logger = get_logger(__name__)

OTHER = {"gpu": "cpu", "cpu": "gpu"}


@dataclass
class SweepReport:
    """What one sweep saw and did."""

    at: float
    transitions: list[Transition] = field(default_factory=list)
    queues: dict[str, dict[str, Any]] = field(default_factory=dict)
    moves: list[MoveReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def moved(self) -> int:
        return sum(len(m.moved) for m in self.moves)

    @property
    def failed(self) -> int:
        return sum(len(m.failed) for m in self.moves)

    def summary(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "transitions": [f"{t.worker}: {t.before} -> {t.after} ({t.reason})" for t in self.transitions],
            "queues": self.queues,
            "moved": self.moved,
            "failed": self.failed,
            "scans": [m.summary() for m in self.moves],
            "seconds": round(self.seconds, 3),
        }


def consumer_counts(settings: Settings) -> dict[str, int] | None:
    """Consumers on each task queue, or None when RabbitMQ cannot be asked."""
    try:
        stats = queue_stats(settings, TASK_QUEUES)
    except Exception as exc:
        logger.warning("cannot count consumers", extra={"error": str(exc)})
        return None
    return {queue: stats[queue]["consumers"] for queue in TASK_QUEUES}


def is_live(view: QueueView, consumers: dict[str, int] | None) -> bool:
    """Whether a queue has a live worker: by heartbeats, or by its consumers when none are known."""
    if consumers is not None and consumers.get(view.queue) == 0:
        return False
    if view.known:
        return view.live > 0
    return bool(consumers and consumers.get(view.queue, 0) > 0)


class Sweeper:
    """Runs the sweep over a registry, a task store and RabbitMQ.

    Parameters:
      settings: thresholds (reroute_after, gpu_max_wait) and the broker URL.
      registry: the worker registry.
      store: the task store, where moves and failures are recorded.
      parameters: how to reach RabbitMQ (default: from ``settings``); None in
        ``settings``-less tests is not allowed.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        store: TaskStore,
        parameters: pika.ConnectionParameters | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.parameters = parameters or connection_parameters(settings)
        self._lock = threading.Lock()

    def sweep(self, now: float | None = None, consumers: dict[str, int] | None = None) -> SweepReport:
        """One sweep; ``consumers`` defaults to RabbitMQ's counts."""
        with self._lock:
            started = time.perf_counter()
            now = time.time() if now is None else now
            if consumers is None:
                consumers = consumer_counts(self.settings)
            report = SweepReport(at=now)
            report.transitions = self.registry.advance(now, consumers)
            self._note_lost_tasks(report.transitions)
            views = self.registry.views(now)
            live = {queue: is_live(views[queue], consumers) for queue in TASK_QUEUES}
            for queue, view in views.items():
                down = None if live[queue] or view.down_since is None else round(now - view.down_since, 1)
                report.queues[queue] = {"live": view.live, "known": view.known, "down_s": down}
            for source in TASK_QUEUES:
                if live[source]:
                    continue
                down_since = views[source].down_since
                down_for = now - down_since if down_since is not None else 0.0
                target = OTHER[source]
                can_move = down_for >= self.settings.reroute_after and live[target]
                can_fail = source == "gpu" and down_for >= self.settings.gpu_max_wait
                if not (can_move or can_fail):
                    continue
                for src, dst in ((source, target), (dq_name(source), dq_name(target))):
                    decide = _Decider(self.settings, source, target, down_for, can_move, now)
                    scan = move_messages(self.parameters, src, dst, decide)
                    report.moves.append(scan)
                    self._record(scan, source, target)
            report.seconds = time.perf_counter() - started
        changed = report.transitions or report.moved or report.failed
        logger.log(logging.INFO if changed else logging.DEBUG, "liveness sweep", extra=report.summary())
        return report

    def _note_lost_tasks(self, transitions: list[Transition]) -> None:
        for change in transitions:
            if change.after not in (WorkerState.stale, WorkerState.dead):
                continue
            for task_id in change.current:
                try:
                    if self.store.get(task_id, events=False).state in FINAL_STATES:
                        continue
                except TaskNotFound:
                    continue
                detail = {"worker": change.worker, "state": change.after.value, "reason": change.reason}
                if change.process is not None:
                    detail["process"] = change.process
                if change.after is WorkerState.dead:
                    detail["reason"] += "; the task returns to its queue when the worker's connection closes"
                self.store.add_event(task_id, f"worker {change.after.value}", detail)

    def _record(self, scan: MoveReport, source: str, target: str) -> None:
        moves = [(m.task_id, source, target, m.reason) for m in scan.moved if m.task_id]
        if moves:
            self.store.reroute(moves, by="sweep")
            for task_id, _, _, reason in moves:
                audit("task.rerouted", task=task_id, source=source, target=target, reason=reason, by="sweep")
        for failed in scan.failed:
            if failed.task_id:
                self.store.mark_failed(failed.task_id, failed.reason, None)


class _Decider:
    """What becomes of each message of a queue with no live worker.

    A task that requires the GPU, or that is too long for a CPU worker
    (``routing.fit_job``), stays on ``gpu`` and fails once it has waited
    ``gpu_max_wait`` seconds there; a moved copy carries the time limit of the
    queue it moves to.
    """

    def __init__(
        self, settings: Settings, source: str, target: str, down_for: float, can_move: bool, now: float
    ) -> None:
        self.settings = settings
        self.source = source
        self.target = target
        self.down_for = down_for
        self.can_move = can_move
        self.now = now
        self.reason = (
            f"no live {source} worker for {down_for:.0f}s (MORAG_REROUTE_AFTER={settings.reroute_after:g}s):"
            f" moved {source} -> {target}"
        )

    def __call__(self, message: dramatiq.Message) -> Decision:
        job = job_of(message)
        if job is None:
            return Decision(Action.keep, "not a task message")
        preference = gpu_preference(job)
        if self.source == "gpu" and (needs := self._needs_gpu(job, preference)):
            waited = min(self.down_for, self.now - message.message_timestamp / 1000)
            if waited >= self.settings.gpu_max_wait:
                return self._fail(message, waited, needs)
            if self.can_move and preference != "require":
                logger.info(
                    "kept on gpu: too long for a CPU worker",
                    extra={"task_id": job.get("task_id"), "reason": needs, "waited_s": round(waited)},
                )
            return Decision(Action.keep, needs)
        if not self.can_move or message.actor_name not in actors_on(self.target):
            return Decision(Action.keep)
        if self.target == "gpu" and preference != "prefer":
            return Decision(Action.keep, "GPU not wanted")
        there = fit_job(job, self.target, self.settings)
        if not there.ok:
            return Decision(Action.keep, f"too long for a {self.target} worker: {there.refused}")
        copy = moved(message, self.target, self.reason, "sweep", there.time_limit_s, at=self.now)
        return Decision(Action.move, self.reason, copy)

    def _needs_gpu(self, job: dict[str, Any], preference: str) -> str | None:
        """Why a task of ``gpu`` must wait there for a GPU worker; None when it may move."""
        if preference == "require":
            return "the task requires one (--gpu require)"
        on_cpu = fit_job(job, "cpu", self.settings)
        return None if on_cpu.ok else f"the task is too long for a CPU worker ({on_cpu.refused})"

    def _fail(self, message: dramatiq.Message, waited: float, needs: str) -> Decision:
        reason = (
            f"no GPU worker came within MORAG_GPU_MAX_WAIT={self.settings.gpu_max_wait:g}s"
            f" (waited {waited:.0f}s) and {needs}"
        )
        queue = q_name(message.queue_name)
        record = {
            "reason": reason,
            "at": self.now,
            "worker": "server (liveness sweep)",
            "queue": queue,
            "retries": message.options.get("retries", 0),
            "deliveries": message.options.get("deliveries", 1),
        }
        letter = message.copy(queue_name=xq_name(queue), options={"dead_letter": record})
        return Decision(Action.fail, reason, letter, queue=xq_name(queue))
