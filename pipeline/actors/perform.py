"""The body every task actor shares: report start, run the job, report completion."""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage, SkipMessage

from pipeline.brokers import current_broker
from pipeline.config import get_settings
from pipeline.errors import BadInput, TaskCanceled, TaskEnded, UnprovenMessage
from pipeline.identity import worker_id, worker_queues
from pipeline.jobs import authorize_job, run_job
from pipeline.kinds import Kind
from pipeline.logs import get_logger
from pipeline.middleware.cancellations import is_canceled
from pipeline.reporting import reporter_for
from pipeline.task_message import check_job
from pipeline.timings import Stopwatch
from pipeline.transfer.transport import Transport, open_transport

logger = get_logger(__name__)

#: Errors that fail a task at once: retrying cannot help.
PERMANENT = (BadInput,)

_local = threading.local()


def _transport() -> Transport:
    transport = getattr(_local, "transport", None)
    if transport is None:
        transport = _local.transport = open_transport(get_settings(), worker_queues())
    return transport


def declare(kind: Kind) -> dramatiq.Actor:
    """The actor of ``kind``: its name and first queue, failing at once on bad input, and moved
    to ``cpu`` when the GPU fails it where the kind may fall back."""

    def run(job: dict[str, Any]) -> None:
        perform(job)

    run.__name__ = run.__qualname__ = kind.actor
    run.__doc__ = f"Run a {kind.name} task ({kind.accepts}): {', '.join(kind.outputs)}."
    options: dict[str, Any] = {"gpu_fallback": True} if kind.fallback and "gpu" in kind.queues else {}
    return dramatiq.actor(run, actor_name=kind.actor, queue_name=kind.queues[0], throws=PERMANENT, **options)


def perform(job: dict[str, Any]) -> None:
    task_id = job["task_id"]
    message = CurrentMessage.get_current_message()
    attempt = (message.options.get("retries", 0) if message else 0) + 1
    queue = message.queue_name if message else "?"
    reporter = reporter_for(current_broker())
    log = {"task_id": task_id, "worker": worker_id(), "queue": queue, "attempt": attempt}
    transport = _transport()
    try:
        # A message that cannot prove the server sent it changes no task: its grant comes first.
        authorize_job(transport, job)
        check_job(job)  # then a job in a schema this worker does not read fails, with the reason
        logger.info("task started", extra=log)
        watch = Stopwatch()  # each stage's wall time, into the result's timings (pipeline.timings)
        with watch.stage("report"):
            reporter.started(task_id, attempt)
        outputs, result = run_job(
            job,
            settings=get_settings(),
            transport=transport,
            events=reporter,
            should_stop=lambda: is_canceled(task_id),
            watch=watch,
        )
    except TaskCanceled as exc:
        # Acknowledged, not retried: the server already holds the task as canceled.
        logger.info("task stopped: canceled", extra=log)
        reporter.note(task_id, "stopped", {"reason": str(exc)})
        return
    except UnprovenMessage as exc:
        logger.warning("task message refused: its grant opens nothing", extra={**log, "reason": str(exc)})
        raise
    except TaskEnded as exc:
        # A message delivered again after its task ended elsewhere: acknowledged, counted as skipped.
        logger.info("task already ended: nothing to do", extra={**log, "reason": str(exc)})
        reporter.note(task_id, "skipped", {"reason": f"the task had already ended: {exc}"})
        raise SkipMessage(str(exc)) from None
    finally:
        # Done, failed or to be retried, this attempt is over: a later delivery carries the grant again.
        transport.forget(task_id)
    if result.get("reused"):
        logger.info("outputs already complete: not run again", extra=log)
    else:
        result.update(worker=worker_id(), queue=queue, attempt=attempt)
    reporter.completed(task_id, outputs, result)
    logger.info("task completed", extra=log)
