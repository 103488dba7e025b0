"""The API's operations on failures: dead letters (list, show, retry, purge) and cancellation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pika
from dramatiq import Broker
from dramatiq.errors import BrokerConnectionError
from fastapi import APIRouter, HTTPException, Request, params
from pydantic import BaseModel, Field

from pipeline.brokers import QUEUES
from pipeline.brokers import deadletters as dead
from pipeline.brokers.cancellations import publish_cancel
from pipeline.brokers.rabbitmq import connection_parameters, queue_stats
from pipeline.errors import TaskNotFound
from pipeline.logs import get_logger
from pipeline.security.audit import audit
from pipeline.services import Services
from pipeline.submission import grant_for

logger = get_logger(__name__)


class Selection(BaseModel):
    """Which dead letters: those of ``queue`` (all queues if absent), only ``ids`` if given."""

    queue: str | None = Field(None, description=" | ".join(QUEUES))
    ids: list[str] | None = Field(None, description="message or task ids")


class CancelRequest(BaseModel):
    reason: str = "canceled by the user"


def _who(request: Request) -> str | None:
    principal = getattr(request.state, "principal", None)
    return principal.name if principal else None


def admin_router(
    services: Services,
    broker: Broker,
    *,
    read: Sequence[params.Depends] = (),
    write: Sequence[params.Depends] = (),
    admin: Sequence[params.Depends] = (),
) -> APIRouter:
    """Endpoints under ``/api/v1``; ``read``, ``write`` and ``admin`` are the dependencies
    (authentication) for looking, for canceling a task, and for changing dead letters."""
    router = APIRouter(prefix="/api/v1")
    settings = services.settings
    store = services.store

    @contextmanager
    def rabbitmq() -> Iterator[pika.ConnectionParameters]:
        try:
            yield connection_parameters(settings)
        except (pika.exceptions.AMQPError, BrokerConnectionError, OSError) as exc:
            raise HTTPException(503, f"RabbitMQ unreachable: {exc or type(exc).__name__}") from None

    def queues_of(queue: str | None) -> tuple[str, ...]:
        if queue is None:
            return QUEUES
        if queue not in QUEUES:
            raise HTTPException(404, f"no queue {queue!r}; queues are {', '.join(QUEUES)}")
        return (queue,)

    @router.get("/dead", tags=["dead letters"], dependencies=list(read))
    def list_dead(queue: str | None = None) -> dict[str, Any]:
        """Dead letters, oldest first per queue, with the reason each failed."""
        queues = queues_of(queue)
        with rabbitmq() as parameters:
            letters = dead.browse(parameters, queues)
            stats = queue_stats(settings, queues)
        counts = {q: stats[f"{q}.XQ"]["messages"] for q in queues}
        return {"counts": counts, "letters": [letter.summary() for letter in letters]}

    @router.get("/dead/{letter_id}", tags=["dead letters"], dependencies=list(read))
    def show_dead(letter_id: str, queue: str | None = None) -> dict[str, Any]:
        """Every dead letter of a message id or a task id: reason, traceback, options, body.

        Grants, signature blocks, tokens and URL passwords are shown as ``[redacted]``, to every key.
        """
        with rabbitmq() as parameters:
            letters = [x for x in dead.browse(parameters, queues_of(queue)) if x.matches([letter_id])]
        if not letters:
            raise HTTPException(404, f"no dead letter for {letter_id}")
        return {"letters": [letter.to_dict() for letter in letters]}

    @router.post("/dead/retry", tags=["dead letters"], dependencies=list(admin))
    def retry_dead(selection: Selection, request: Request) -> dict[str, Any]:
        """Send dead letters back to their queues; their tasks go back to queued, history kept."""
        with rabbitmq() as parameters:
            outcome = dead.retry(
                parameters, broker, store, queues_of(selection.queue), selection.ids,
                regrant=lambda task_id, path: grant_for(services, task_id, path),
            )  # fmt: skip
        audit("deadletter.retry", by=_who(request), queue=selection.queue, ids=selection.ids,
              retried=[x.get("message_id") for x in outcome["retried"]])  # fmt: skip
        return outcome

    @router.post("/dead/purge", tags=["dead letters"], dependencies=list(admin))
    def purge_dead(selection: Selection, request: Request) -> dict[str, Any]:
        """Drop dead letters for good."""
        with rabbitmq() as parameters:
            purged = dead.purge(parameters, queues_of(selection.queue), selection.ids)
        audit("deadletter.purge", by=_who(request), queue=selection.queue, ids=selection.ids, purged=purged)
        return {"purged": purged}

    @router.post(
        "/tasks/{task_id}/cancel",
        tags=["tasks"],
        dependencies=list(write),
        responses={409: {"description": "the task already ended"}},
    )
    def cancel_task(task_id: str, request: CancelRequest | None = None) -> dict[str, Any]:
        """Cancel a queued or running task.

        The task is ``canceled`` at once and for good; workers hear of it
        through the cancellation stream: a queued task is skipped when it
        reaches one, a running transcription stops at its next segment.
        """
        reason = (request or CancelRequest()).reason
        try:
            if not store.mark_canceled(task_id, reason):
                state = store.get(task_id, events=False).state
                raise HTTPException(409, f"task {task_id} is {state}: nothing to cancel")
        except TaskNotFound:
            raise HTTPException(404, f"no task {task_id}") from None
        notified = True
        try:
            publish_cancel(connection_parameters(settings), task_id, reason)
        except (pika.exceptions.AMQPError, OSError) as exc:
            # The task stays canceled: a worker that runs it anyway has its completion ignored.
            notified = False
            logger.warning("cancellation notice not sent", extra={"task_id": task_id, "error": str(exc)})
            store.add_event(task_id, "cancel notice not sent", {"error": str(exc)})
        return {**store.get(task_id).to_dict(), "notified": notified}

    return router
