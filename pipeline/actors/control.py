"""Actors of the ``control`` queue, consumed by the server: what workers report
(``pipeline.control`` names every message): task events, task moves, heartbeats and goodbyes.

Each handler is idempotent and applies its message at least once: the
message's nonce (``applied_nonce``) is recorded in the transaction of its
effect, so a handler that fails is retried, and a redelivered message that was
applied changes nothing. A late report is judged by the task's state, never
by its age: a completion for a task that ended is recorded and ignored.

Every handler takes ``**newer``: fields a newer worker adds to a report in the
same schema (``pipeline.control``) are ignored, never an error.
"""

from __future__ import annotations

import shutil
from typing import Any

import dramatiq
import pika
from dramatiq.middleware import CurrentMessage

from pipeline import chunks, control
from pipeline.brokers import current_broker
from pipeline.brokers.cancellations import publish_cancel
from pipeline.brokers.rabbitmq import connection_parameters
from pipeline.errors import BadInput, ChecksumMismatch
from pipeline.fleet.registry import BadHeartbeat, get_registry
from pipeline.kinds import HANDOFF, kind_of
from pipeline.logs import get_logger
from pipeline.outputs import check_outputs
from pipeline.security.audit import audit
from pipeline.services import get_services
from pipeline.store import FINAL_STATES, State
from pipeline.submission import carried, hand_on, hand_on_url
from pipeline.transfer.checksums import FileRef

broker = current_broker()
logger = get_logger(__name__)

_options = {"queue_name": control.QUEUE, "max_retries": 5, "min_backoff": 500}
#: A heartbeat is not retried: the next one says the same, only newer.
_beats = {"queue_name": control.QUEUE, "max_retries": 0}


def applied_nonce() -> str | None:
    """The nonce of the message being handled, recorded with its effect (None: unsigned, dev mode)."""
    message = CurrentMessage.get_current_message()
    return message.options.get("nonce") if message is not None else None


@dramatiq.actor(actor_name=control.TASK_STARTED, **_options)
def task_started(task_id: str, attempt: int, worker: str, ts: float, **newer: Any) -> None:
    if get_services().store.mark_running(task_id, worker, attempt, nonce=applied_nonce()):
        logger.info("task running", extra={"task_id": task_id, "worker": worker})


@dramatiq.actor(actor_name=control.TASK_PROGRESS, **_options)
def task_progress(
    task_id: str, stage: str, percent: float, eta_s: float | None, worker: str, ts: float, **newer: Any
) -> None:
    progress = {"stage": stage, "percent": percent, "eta_s": eta_s, "at": ts}
    services = get_services()
    services.store.set_progress(task_id, progress, nonce=applied_nonce())
    if chunks.SEPARATOR in task_id:  # a chunk of a long recording: its task's progress too
        chunks.chunk_progress(services, services.store.get(task_id, events=False))


@dramatiq.actor(actor_name=control.TASK_COMPLETED, **_options)
def task_completed(
    task_id: str, outputs: list[dict[str, Any]], result: dict[str, Any], worker: str, ts: float, **newer: Any
) -> None:
    """Verify every output on the server's side, then mark the task done.

    Each output must be a file directly in this task's output folder, with a
    safe name and a format of the task's kind (``pipeline.outputs``), reached
    through no symbolic link, and match its size and SHA-256: a completion
    that reports anything else (another task's file, ``.bashrc``, ``../x``)
    fails the task with the reason.

    A task is done once: a second completion (a redelivered message whose
    worker found the outputs complete) is recorded and ignored. A completion
    for a canceled task (its worker missed the cancellation) is ignored too,
    and the outputs it left are removed (never through a symbolic link). So
    is the completion of a stage the task has gone on from (``result["kind"]``
    names the stage's kind).

    A completion that hands a file on (``pipeline.kinds.HANDOFF``) ends a stage,
    not the task: the task goes on as that file's kind (``submission.hand_on``). So
    does one whose result names a kind to go on as with the task's URL
    (``goes_on_as``: ``submission.hand_on_url``). The final result holds what the
    earlier stages carry (``submission.carried``).
    """
    services = get_services()
    log = {"task_id": task_id, "worker": worker}
    task = services.store.get(task_id, events=False)
    state = task.state
    if state in FINAL_STATES:
        detail = {"worker": worker, "state": state}
        services.store.add_event(task_id, "completion ignored", detail, nonce=applied_nonce())
        if state is State.canceled:
            try:
                shutil.rmtree(services.files.resolve_plain(f"tasks/{task_id}/output"), ignore_errors=True)
            except BadInput as exc:
                logger.warning("outputs of a canceled task not removed", extra={**log, "error": str(exc)})
        logger.info("completion for a finished task ignored", extra={**log, "state": state})
        if state is State.done:  # a retried report of a chunk: its task may still await it
            chunks.chunk_ended(services, task)
        return
    if result.get("kind", task.kind) != task.kind:
        detail = {"worker": worker, "stage": result["kind"], "now": task.kind}
        services.store.add_event(
            task_id, "completion of an earlier stage ignored", detail, nonce=applied_nonce()
        )
        return
    try:
        outputs = check_outputs(task_id, task.kind, outputs)
        for output in outputs:
            services.files.check(FileRef.from_dict(output))
    except (ChecksumMismatch, BadInput) as exc:
        logger.warning("output failed verification", extra={**log, "error": str(exc)})
        if isinstance(exc, BadInput):  # not where it must be, or not what it must be called
            audit("output.refused", task=task_id, worker=worker, reason=str(exc))
        services.store.mark_failed(
            task_id, f"output failed verification: {exc}", worker, nonce=applied_nonce()
        )
        return
    if kind_of(task.kind).chunks_as and "chunks" in result:
        chunks.fan_out(services, broker, task, result, worker, nonce=applied_nonce())
        return
    handed = [output for output in outputs if output["format"] == HANDOFF]
    if handed:
        hand_on(services, broker, task, handed[0], result, worker, nonce=applied_nonce())
        return
    if result.get("goes_on_as"):
        hand_on_url(services, broker, task, result, worker, nonce=applied_nonce())
        return
    result = {**carried(task), **result}
    if services.store.mark_done(task_id, outputs, result, worker, nonce=applied_nonce()):
        logger.info("task done", extra=log)
        chunks.chunk_ended(services, task, _notify_cancel)
    else:
        logger.warning("completion for a finished task ignored", extra=log)


@dramatiq.actor(actor_name=control.TASK_RETRYING, **_options)
def task_retrying(task_id: str, reason: str, attempts: int, worker: str, ts: float, **newer: Any) -> None:
    services = get_services()
    if services.store.get(task_id, events=False).state in FINAL_STATES:
        return
    detail = {"reason": reason, "attempts": attempts, "worker": worker}
    services.store.add_event(task_id, "retrying", detail, nonce=applied_nonce())
    services.store.set_progress(task_id, {"stage": "retrying", "percent": 0.0, "reason": reason})


@dramatiq.actor(actor_name=control.TASK_FAILED, **_options)
def task_failed(task_id: str, reason: str, attempts: int, worker: str, ts: float, **newer: Any) -> None:
    services = get_services()
    if services.store.mark_failed(task_id, reason, worker, nonce=applied_nonce()):
        logger.warning("task failed", extra={"task_id": task_id, "worker": worker, "reason": reason})
        if chunks.SEPARATOR in task_id:  # a chunk of a long recording fails its task
            chunks.chunk_ended(services, services.store.get(task_id, events=False), _notify_cancel)


def _notify_cancel(task_id: str, reason: str) -> None:
    """Tell the workers that ``task_id`` (a chunk) was canceled; a notice not sent is logged."""
    try:
        publish_cancel(connection_parameters(get_services().settings), task_id, reason)
    except (pika.exceptions.AMQPError, OSError) as exc:
        logger.warning("cancellation notice not sent", extra={"task_id": task_id, "error": str(exc)})


@dramatiq.actor(actor_name=control.TASK_NOTE, **_options)
def task_note(task_id: str, event: str, detail: dict[str, Any], worker: str, ts: float, **newer: Any) -> None:
    """An event a worker adds to the task's history: redelivered, skipped, stopped, reused."""
    get_services().store.add_event(task_id, event, {**detail, "worker": worker}, nonce=applied_nonce())


# Workers: heartbeats and goodbyes keep the registry.


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
def worker_heartbeat(worker: str, capability: str, beat: dict[str, Any], **newer: Any) -> None:
    try:
        record = get_registry().heartbeat(unseal(worker, capability, beat))
    except BadHeartbeat as exc:
        logger.warning("heartbeat rejected", extra={"worker": worker, "error": str(exc)})
        return
    if record is None:
        logger.info("heartbeat after goodbye ignored", extra={"worker": worker})


@dramatiq.actor(actor_name=control.WORKER_GOODBYE, **_beats)
def worker_goodbye(worker: str, capability: str, beat: dict[str, Any], **newer: Any) -> None:
    try:
        if get_registry().goodbye(unseal(worker, capability, beat)):
            logger.info("worker gone", extra={"worker": worker, "done": beat.get("done")})
    except BadHeartbeat as exc:
        logger.warning("goodbye rejected", extra={"worker": worker, "error": str(exc)})


@dramatiq.actor(actor_name=control.TASK_REROUTED, **_options)
def task_rerouted(
    task_id: str, source: str, target: str, reason: str, worker: str, ts: float, **newer: Any
) -> None:
    """A worker moved the task's message to another queue (a GPU failure sends it to ``cpu``)."""
    if get_services().store.reroute([(task_id, source, target, reason)], by=worker, nonce=applied_nonce()):
        logger.info("task rerouted", extra={"task_id": task_id, "worker": worker, "to": target})
        audit("task.rerouted", task=task_id, source=source, target=target, reason=reason, by=worker)
