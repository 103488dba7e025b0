"""Actors of the ``control`` queue, consumed by the server: task events from workers."""

from __future__ import annotations

import shutil
from typing import Any

import dramatiq

from pipeline.actors import liveness  # noqa: F401  (heartbeats and task moves arrive on control too)
from pipeline.brokers import current_broker
from pipeline.errors import BadInput, ChecksumMismatch
from pipeline.logs import get_logger
from pipeline.services import get_services
from pipeline.store import FINAL_STATES, State
from pipeline.transfer.checksums import FileRef

broker = current_broker()
logger = get_logger(__name__)

_options = {"queue_name": "control", "max_retries": 5, "min_backoff": 500}


@dramatiq.actor(**_options)
def task_started(task_id: str, attempt: int, worker: str, ts: float) -> None:
    if get_services().store.mark_running(task_id, worker, attempt):
        logger.info("task running", extra={"task_id": task_id, "worker": worker})


@dramatiq.actor(**_options)
def task_progress(
    task_id: str, stage: str, percent: float, eta_s: float | None, worker: str, ts: float
) -> None:
    get_services().store.set_progress(task_id, {"stage": stage, "percent": percent, "eta_s": eta_s, "at": ts})


@dramatiq.actor(**_options)
def task_completed(
    task_id: str, outputs: list[dict[str, Any]], result: dict[str, Any], worker: str, ts: float
) -> None:
    """Verify every output on the server's side (size and SHA-256), then mark the task done.

    A task is done once: a second completion (a redelivered message whose
    worker found the outputs complete) is recorded and ignored. A completion
    for a canceled task (its worker missed the cancellation) is ignored too,
    and the outputs it left are removed.
    """
    services = get_services()
    log = {"task_id": task_id, "worker": worker}
    state = services.store.get(task_id, events=False).state
    if state in FINAL_STATES:
        services.store.add_event(task_id, "completion ignored", {"worker": worker, "state": state})
        if state is State.canceled:
            shutil.rmtree(services.files.resolve(f"tasks/{task_id}/output"), ignore_errors=True)
        logger.info("completion for a finished task ignored", extra={**log, "state": state})
        return
    try:
        for output in outputs:
            services.files.check(FileRef.from_dict(output))
    except (ChecksumMismatch, BadInput) as exc:
        logger.warning("output failed verification", extra={**log, "error": str(exc)})
        services.store.mark_failed(task_id, f"output failed verification: {exc}", worker)
        return
    if services.store.mark_done(task_id, outputs, result, worker):
        logger.info("task done", extra=log)
    else:
        logger.warning("completion for a finished task ignored", extra=log)


@dramatiq.actor(**_options)
def task_retrying(task_id: str, reason: str, attempts: int, worker: str, ts: float) -> None:
    services = get_services()
    if services.store.get(task_id, events=False).state in FINAL_STATES:
        return
    services.store.add_event(task_id, "retrying", {"reason": reason, "attempts": attempts, "worker": worker})
    services.store.set_progress(task_id, {"stage": "retrying", "percent": 0.0, "reason": reason})


@dramatiq.actor(**_options)
def task_failed(task_id: str, reason: str, attempts: int, worker: str, ts: float) -> None:
    if get_services().store.mark_failed(task_id, reason, worker):
        logger.warning("task failed", extra={"task_id": task_id, "worker": worker, "reason": reason})


@dramatiq.actor(**_options)
def task_note(task_id: str, event: str, detail: dict[str, Any], worker: str, ts: float) -> None:
    """An event a worker adds to the task's history: redelivered, skipped, stopped, reused."""
    get_services().store.add_event(task_id, event, {**detail, "worker": worker})
