"""Dead letters over HTTP: list, show, retry, purge (``/api/v1/dead``); changes are audited."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pika
from dramatiq import Broker
from dramatiq.errors import BrokerConnectionError
from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from pipeline.api.auth import Access, acting_name
from pipeline.brokers import QUEUES
from pipeline.brokers import deadletters as dead
from pipeline.brokers.rabbitmq import connection_parameters, queue_stats
from pipeline.config import Settings
from pipeline.security.audit import audit
from pipeline.services import Services
from pipeline.submission import grant_for


class Selection(BaseModel):
    """Which dead letters: those of ``queue`` (all queues if absent), only ``ids`` if given."""

    queue: str | None = Field(None, description=" | ".join(QUEUES))
    ids: list[str] | None = Field(None, description="message or task ids")


@contextmanager
def rabbitmq(settings: Settings) -> Iterator[pika.ConnectionParameters]:
    """RabbitMQ's connection parameters; HTTPException 503 when it cannot be reached meanwhile."""
    try:
        yield connection_parameters(settings)
    except (pika.exceptions.AMQPError, BrokerConnectionError, OSError) as exc:
        raise HTTPException(503, f"RabbitMQ unreachable: {exc or type(exc).__name__}") from None


def queues_of(queue: str | None) -> tuple[str, ...]:
    """The queues a request names: one, or all when ``queue`` is None; 404 for an unknown name."""
    if queue is None:
        return QUEUES
    if queue not in QUEUES:
        raise HTTPException(404, f"no queue {queue!r}; queues are {', '.join(QUEUES)}")
    return (queue,)


def deadletters_router(services: Services, broker: Broker, access: Access) -> APIRouter:
    """Routes under ``/api/v1/dead``: reading needs ``access.read``, retry and purge ``access.admin``.

    A retried message is published through ``broker``.
    """
    router = APIRouter(prefix="/api/v1/dead", tags=["dead letters"])
    settings = services.settings
    store = services.store

    @router.get("", dependencies=access.read)
    def list_dead(queue: str | None = None) -> dict[str, Any]:
        """Dead letters, oldest first per queue, with the reason each failed."""
        queues = queues_of(queue)
        with rabbitmq(settings) as parameters:
            letters = dead.browse(parameters, queues)
            stats = queue_stats(settings, queues)
        counts = {q: stats[f"{q}.XQ"]["messages"] for q in queues}
        return {"counts": counts, "letters": [letter.summary() for letter in letters]}

    @router.get("/{letter_id}", dependencies=access.read)
    def show_dead(letter_id: str, queue: str | None = None) -> dict[str, Any]:
        """Every dead letter of a message id or a task id: reason, traceback, options, body.

        Grants, signature blocks, tokens and URL passwords are shown as ``[redacted]``, to every key.
        """
        with rabbitmq(settings) as parameters:
            letters = [x for x in dead.browse(parameters, queues_of(queue)) if x.matches([letter_id])]
        if not letters:
            raise HTTPException(404, f"no dead letter for {letter_id}")
        return {"letters": [letter.to_dict() for letter in letters]}

    @router.post("/retry", dependencies=access.admin)
    def retry_dead(selection: Selection, request: Request) -> dict[str, Any]:
        """Send dead letters back to their queues; their tasks go back to queued, history kept."""
        with rabbitmq(settings) as parameters:
            outcome = dead.retry(
                parameters, broker, store, queues_of(selection.queue), selection.ids,
                regrant=lambda task_id, path: grant_for(services, task_id, path),
            )  # fmt: skip
        audit("deadletter.retry", by=acting_name(request), queue=selection.queue, ids=selection.ids,
              retried=[x.get("message_id") for x in outcome["retried"]])  # fmt: skip
        return outcome

    @router.post("/purge", dependencies=access.admin)
    def purge_dead(selection: Selection, request: Request) -> dict[str, Any]:
        """Drop dead letters for good."""
        with rabbitmq(settings) as parameters:
            purged = dead.purge(parameters, queues_of(selection.queue), selection.ids)
        audit("deadletter.purge", by=acting_name(request), queue=selection.queue, ids=selection.ids,
              purged=purged)  # fmt: skip
        return {"purged": purged}

    return router
