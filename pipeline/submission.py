"""From an uploaded file to a published task message.

Used by the API and by the embedded ``run`` mode alike: classify the content,
choose the route, move the file into the task store, record the task
(``record``), and publish its message to the chosen queue (``deliver``).

The task record is the outbox: it is written before its message is
published, and marked published once the broker confirmed the message. A
server that dies between the two, or a broker that stays away longer than
``MORAG_PUBLISH_WAIT_S``, leaves the task queued and unpublished, and the
reconciler (``pipeline.fleet.reconciler``) publishes it on its next sweep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from dramatiq import Broker

from pipeline.config import Settings
from pipeline.errors import TaskNotFound
from pipeline.logs import get_logger
from pipeline.routing import WorkerView, as_capacity, choose_route, classify, fit_job
from pipeline.security.audit import audit
from pipeline.security.grants import DEFAULT_CAPABILITY, issue_grant
from pipeline.services import Services
from pipeline.store import State, Task, new_task_id
from pipeline.task_message import build_job

logger = get_logger(__name__)

#: The actor that handles each kind of task.
ACTORS = {"transcribe": "transcribe", "convert": "convert_document"}


@dataclass
class SubmitOptions:
    priority: str = "normal"
    gpu: str = "prefer"
    language: str | None = None
    model: str | None = None


def grant_for(services: Services, task_id: str, input_path: str, queue: str | None = None) -> str:
    """A transfer grant for one task: read its input, read and write its outputs.

    The grant is issued to the workers of ``queue`` (gpu or cpu; by default
    the queue the store routes the task to now, gpu for a task it does not
    know): only their tokens may present it, or those of a queue the task is
    rerouted to later.
    """
    if queue is None:
        try:
            queue = str(services.store.get(task_id, events=False).route["queue"])
        except TaskNotFound:
            queue = DEFAULT_CAPABILITY
    return issue_grant(services.tokens.secret, task_id, [input_path], services.settings.grant_ttl_s, queue)


def publish(broker: Broker, task: Task, settings: Settings, grant: str | None = None) -> str:
    """Publish a task's message to its route's queue; returns the message id.

    Dramatiq picks the queue from the actor, so the message is copied onto the
    routed queue before it is published.
    """
    actor = broker.get_actor(ACTORS[task.kind])
    job = build_job(task, grant)
    # The limit on the queue the task is on now: the route may have moved since submit.
    limit = fit_job(job, task.route["queue"], settings).time_limit_s
    message = actor.message_with_options(
        kwargs={"job": job}, broker_priority=task.route["broker_priority"], time_limit=limit * 1000
    ).copy(queue_name=task.route["queue"])
    broker.enqueue(message)
    return message.message_id


def record(
    services: Services,
    upload: Path,
    filename: str,
    sha256: str,
    size: int,
    options: SubmitOptions,
    gpu_workers: Callable[[], WorkerView],
) -> Task:
    """Classify and route an uploaded file and record its task, unpublished. Raises BadInput for
    content refused.

    ``gpu_workers`` says what is known of the workers: the number of live GPU
    workers, or a ``Capacity`` with each queue's load too (None: unknown).
    """
    found = classify(upload, filename, services.settings)
    known = gpu_workers() if found.kind == "transcribe" and options.gpu == "prefer" else None
    route = choose_route(
        found,
        services.settings,
        priority=options.priority,
        gpu=options.gpu,
        capacity=as_capacity(known),
    )
    task_id = new_task_id()
    ref = services.files.add_input(task_id, filename, upload, sha256, size)
    task = Task(
        id=task_id,
        kind=found.kind,
        state=State.queued,
        filename=Path(filename.replace("\\", "/")).name or "upload",
        input={**ref.to_dict(), "media": found.to_dict()},
        options={k: v for k, v in asdict(options).items() if v is not None},
        route=route.to_dict(),
    )
    services.store.create(task)
    if route.fallback:
        detail = {"from": "gpu", "to": route.queue, "reason": route.fallback, "by": "submit"}
        services.store.add_event(task_id, "rerouted", detail)
        audit(
            "task.rerouted",
            task=task_id,
            source="gpu",
            target=route.queue,
            reason=route.fallback,
            by="submit",
        )
    return task


def deliver(services: Services, broker: Broker, task: Task, by: str, wait_s: float | None = None) -> bool:
    """Publish the task's message with a fresh grant, trying through a broker restart for up to
    ``wait_s`` seconds (default ``MORAG_PUBLISH_WAIT_S``); then mark it published.

    False when the broker stayed away: the task stays in the outbox (an event
    says so) and the reconciler publishes it later.
    """
    wait_s = services.settings.publish_wait_s if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    pause = 0.5
    while True:
        try:
            grant = grant_for(services, task.id, task.input["path"], task.route["queue"])
            message_id = publish(broker, task, services.settings, grant)
            break
        except Exception as exc:
            if time.monotonic() + pause > deadline:
                reason = f"broker unreachable ({type(exc).__name__}: {exc}); the server publishes it later"
                services.store.add_event(task.id, "publish pending", {"reason": reason, "by": by})
                logger.warning("task not published yet", extra={"task_id": task.id, "error": str(exc)})
                return False
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
    services.store.mark_published(task.id, message_id, task.route["queue"], by)
    logger.info(
        "task published",
        extra={
            "task_id": task.id,
            "queue": task.route["queue"],
            "priority": task.route["priority"],
            "by": by,
        },
    )
    return True


def submit(
    services: Services,
    broker: Broker,
    upload: Path,
    filename: str,
    sha256: str,
    size: int,
    options: SubmitOptions,
    gpu_workers: Callable[[], WorkerView],
) -> Task:
    """Turn an uploaded file into a queued task (``record``) and publish it (``deliver``).

    Raises BadInput for content refused. A broker that stays away does not
    fail the task: it is recorded, and published as soon as the broker is back.
    """
    task = record(services, upload, filename, sha256, size, options, gpu_workers)
    deliver(services, broker, task, by="submit")
    return services.store.get(task.id)
