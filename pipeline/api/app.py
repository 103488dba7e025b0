"""The HTTP API: submit files, follow tasks, fetch results, watch the fleet. OpenAPI at ``/docs``
and ``/redoc``, whose pages load nothing from outside the server.

One module per resource, each a router: health, tasks, workers, queues, dead
letters, metrics, the dashboard, the OpenAI-compatible speech endpoints.
``create_app`` builds the guards and includes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dramatiq import Broker
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from pipeline import __version__
from pipeline.api.auth import Access, Authenticator
from pipeline.api.dashboard import dashboard_router
from pipeline.api.deadletters import deadletters_router
from pipeline.api.events import events_router
from pipeline.api.health import health_router
from pipeline.api.metrics import metrics_router
from pipeline.api.openai import add_openai_api
from pipeline.api.queues import BrokerQueues, queues_router
from pipeline.api.tasks import tasks_router
from pipeline.api.workers import workers_router
from pipeline.services import Services


def create_app(
    services: Services,
    broker: Broker,
    gpu_workers: Callable[[], int | None],
    auth: Authenticator,
    health: Callable[[], tuple[bool, dict[str, Any]]] = lambda: (True, {}),
) -> FastAPI:
    """The API over ``services``; tasks are published through ``broker``.

    ``gpu_workers`` tells how many GPU workers are connected (None: unknown);
    ``auth`` checks API keys and roles; ``health`` says whether every part of
    the server works, and how each stands (``pipeline.health.report``).
    """
    # /docs and /redoc load Swagger UI and ReDoc from the package (fastapi-offline), not a CDN.
    app = FastAPIOffline(
        static_url="/docs-static",
        title="morag-pipeline",
        version=__version__,
        description="Submit audio, video and documents; follow their tasks; fetch results.",
    )
    access = Access.of(auth)
    queues = BrokerQueues(services.settings)  # the dashboard's reading of RabbitMQ, shared by its pages
    app.include_router(health_router(health))
    app.include_router(tasks_router(services, broker, gpu_workers, access))
    app.include_router(events_router(services, access))
    app.include_router(deadletters_router(services, broker, access))
    app.include_router(workers_router(services, broker, access))
    app.include_router(queues_router(services, broker, access))
    app.include_router(metrics_router(services, broker, read=access.read))
    app.include_router(dashboard_router(services, access, queues))
    add_openai_api(app, services, broker, gpu_workers, access)

    @app.middleware("http")
    async def timing(request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={1000 * (time.perf_counter() - started):.1f}"
        return response

    return app
