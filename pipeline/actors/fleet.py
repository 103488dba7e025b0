"""The fleet's actor, run by the server's liveness process: the sweep and the reconciler.

``liveness_sweep`` is on ``liveness``, a queue only the server publishes to
and consumes, sent by the periodiq scheduler every minute
(``MORAG_SWEEP_CRON``) or by hand (``POST /api/v1/workers/sweep``). The sweep
has its own queue and consumer thread so that a long one (thousands of
messages to move) never holds up task events and heartbeats; it carries no
arguments, so anyone able to publish it can only make the server look sooner.
"""

from __future__ import annotations

import os
import socket
import time

import dramatiq
from periodiq import PeriodiqMiddleware, cron

from pipeline.brokers import current_broker
from pipeline.config import get_settings
from pipeline.fleet.reconciler import Reconciler
from pipeline.fleet.registry import get_registry
from pipeline.fleet.sweep import Sweeper
from pipeline.health import SWEEP_PART, PartLog
from pipeline.history import take_sample
from pipeline.logs import get_logger
from pipeline.middleware.cancellations import Cancellations
from pipeline.services import get_services

broker = current_broker()
# The sweep is the one actor on a schedule: the middleware that accepts its ``periodic`` option
# (and skips a tick older than 30 s) joins the broker here, not every worker's stack.
broker.add_middleware(PeriodiqMiddleware(skip_delay=30), before=Cancellations)
logger = get_logger(__name__)

#: The queue of the sweep, consumed by the server alone.
SWEEP_QUEUE = "liveness"


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
    started = time.time()
    done: dict[str, object] = {"by": replica_name()}
    try:
        done["moved"] = sweep.sweep().moved
    except Exception as exc:
        logger.exception("liveness sweep failed", extra={"error": str(exc)})
    try:
        done["reconciled"] = reconcile.run().summary()
    except Exception as exc:
        logger.exception("reconciler failed", extra={"error": str(exc)})
    done["seconds"] = round(time.time() - started, 3)
    logger.info("sweep ran", extra={**done, "started": started})
    if "moved" in done and "reconciled" in done:
        PartLog(get_settings()).mark(SWEEP_PART, done)
    try:  # the dashboard's charts: one sample of each task queue per sweep
        take_sample(get_settings())
    except Exception as exc:
        logger.exception("history sample failed", extra={"error": str(exc)})


def replica_name() -> str:
    """The server this liveness process belongs to: its host and the server's pid."""
    return f"{socket.gethostname()} pid {os.getppid()}"
