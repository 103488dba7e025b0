"""Actors that keep the worker registry, run by the server.

On ``control``: ``worker_heartbeat`` and ``worker_goodbye`` from every
worker's Heartbeat middleware, ``task_rerouted`` from a worker that handed a
task to another queue. On ``liveness``, a queue only the server publishes to
and consumes: ``liveness_sweep``, sent by the periodiq scheduler every minute
(``MORAG_SWEEP_CRON``) or by hand (``POST /api/v1/workers/sweep``). The sweep
has its own queue and consumer thread so that a long one (thousands of
messages to move) never holds up task events and heartbeats; it carries no
arguments, so anyone able to publish it can only make the server look sooner.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from periodiq import cron

from pipeline import control
from pipeline.brokers import current_broker
from pipeline.config import get_settings
from pipeline.health import SWEEP_PART, PartLog
from pipeline.liveness import Sweeper
from pipeline.logs import get_logger
from pipeline.reconciler import Reconciler
from pipeline.registry import BadHeartbeat, get_registry
from pipeline.security.audit import audit
from pipeline.services import get_services

broker = current_broker()
logger = get_logger(__name__)

#: A heartbeat is not retried: the next one says the same, only newer.
_beats = {"queue_name": control.QUEUE, "max_retries": 0}
_events = {"queue_name": control.QUEUE, "max_retries": 5, "min_backoff": 500}


#: The queue of the sweep, consumed by the server alone.
SWEEP_QUEUE = "liveness"


def unseal(worker: str, capability: str, beat: Any) -> dict[str, Any]:
    """The heartbeat a message carries; the counterpart of ``pipeline.middleware.heartbeat.seal``.

    MessageSigning has checked ``worker`` and ``capability`` against the
    sender's token (where workers hold tokens); the beat must agree with them.
    """
    if not isinstance(beat, dict):
        raise BadHeartbeat("heartbeat is not an object")
    if beat.get("worker") != worker or beat.get("capability") != capability:
        raise BadHeartbeat(f"heartbeat of {beat.get('worker')!r} sent as {worker!r}")
    return beat


@dramatiq.actor(actor_name=control.WORKER_HEARTBEAT, **_beats)
def worker_heartbeat(worker: str, capability: str, beat: dict[str, Any]) -> None:
    try:
        record = get_registry().heartbeat(unseal(worker, capability, beat))
    except BadHeartbeat as exc:
        logger.warning("heartbeat rejected", extra={"worker": worker, "error": str(exc)})
        return
    if record is None:
        logger.info("heartbeat after goodbye ignored", extra={"worker": worker})


@dramatiq.actor(actor_name=control.WORKER_GOODBYE, **_beats)
def worker_goodbye(worker: str, capability: str, beat: dict[str, Any]) -> None:
    try:
        if get_registry().goodbye(unseal(worker, capability, beat)):
            logger.info("worker gone", extra={"worker": worker, "done": beat.get("done")})
    except BadHeartbeat as exc:
        logger.warning("goodbye rejected", extra={"worker": worker, "error": str(exc)})


@dramatiq.actor(actor_name=control.TASK_REROUTED, **_events)
def task_rerouted(task_id: str, source: str, target: str, reason: str, worker: str, ts: float) -> None:
    """A worker moved the task's message to another queue (a GPU failure sends it to ``cpu``)."""
    from pipeline.actors.control import applied_nonce

    if get_services().store.reroute([(task_id, source, target, reason)], by=worker, nonce=applied_nonce()):
        logger.info("task rerouted", extra={"task_id": task_id, "worker": worker, "to": target})
        audit("task.rerouted", task=task_id, source=source, target=target, reason=reason, by=worker)


_parts: dict[int, tuple[Sweeper, Reconciler]] = {}


def sweeper() -> Sweeper:
    """This process's sweeper over its settings, registry and store."""
    return _sweep_parts()[0]


def _sweep_parts() -> tuple[Sweeper, Reconciler]:
    settings = get_settings()
    key = id(settings)
    if key not in _parts:
        _parts.clear()
        registry, services = get_registry(settings), get_services()
        _parts[key] = (Sweeper(settings, registry, services.store), Reconciler(services, registry, broker))
    return _parts[key]


@dramatiq.actor(queue_name=SWEEP_QUEUE, max_retries=0, periodic=cron(get_settings().sweep_cron))
def liveness_sweep() -> None:
    """Sweep the registry (stale and dead workers, rerouted and timed-out tasks), then reconcile.

    Each part runs even when the other failed; when both ran, the time is
    written for ``/healthz``.
    """
    sweep, reconcile = _sweep_parts()
    done: dict[str, object] = {}
    try:
        done["moved"] = sweep.sweep().moved
    except Exception as exc:
        logger.exception("liveness sweep failed", extra={"error": str(exc)})
    try:
        done["reconciled"] = reconcile.run().summary()
    except Exception as exc:
        logger.exception("reconciler failed", extra={"error": str(exc)})
    if len(done) == 2:
        PartLog(get_settings().db_path).mark(SWEEP_PART, done)
