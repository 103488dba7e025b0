"""Monitoring over HTTP: Prometheus' ``/metrics``.

It needs the readonly role: Prometheus sends a readonly API key as its
bearer token (``authorization.credentials_file`` in its scrape config).
Every figure comes from the store, the registry and RabbitMQ
(``pipeline.metrics``), so a restarted server reports what it did before.
"""

from __future__ import annotations

from collections.abc import Sequence

from dramatiq import Broker
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from fastapi import APIRouter
from fastapi.params import Depends
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from pipeline.db import Database, database_target
from pipeline.exposition import CONTENT_TYPE, render
from pipeline.fleet.registry import get_registry
from pipeline.logs import get_logger
from pipeline.metrics import EndedTotals, collect
from pipeline.services import Services

logger = get_logger(__name__)


def metrics_router(services: Services, broker: Broker, read: Sequence[Depends] = ()) -> APIRouter:
    """``/metrics`` over ``services``' database; ``read`` guards it. RabbitMQ's figures are
    asked for only when ``broker`` is RabbitMQ."""
    settings = services.settings
    rabbitmq = isinstance(broker, RabbitmqBroker)
    router = APIRouter()
    db = Database(database_target(settings))
    registry = get_registry(settings)
    totals = EndedTotals()  # the ended tasks' figures, each task read once

    @router.get(
        "/metrics",
        tags=["monitoring"],
        dependencies=list(read),
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
    )
    async def metrics() -> Response:
        """Every metric in Prometheus' text format, read from the store, the registry and RabbitMQ now."""
        snapshot = await run_in_threadpool(collect, settings, db, registry, None, rabbitmq, totals)
        return Response(render(snapshot.families), media_type=CONTENT_TYPE)

    return router
