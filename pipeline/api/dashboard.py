"""The dashboard: pages at ``/dashboard``, and the data they poll under ``/api/v1/dashboard``.

The pages are static files shipped in the package (``pipeline/api/static``:
one HTML shell, a script and a style sheet; no build step, nothing from a
CDN) and need no key to load: they hold no data. Their script asks for the
API key once, keeps it in the tab's ``sessionStorage`` and sends it as an
``Authorization`` header with every request, never in a URL. The data
endpoints need the readonly role; the pages' actions (cancel a task, retry
or purge a dead letter) call the API's own endpoints, which need their own
roles and audit who acted.

The pages poll the data every two seconds (server-sent events cannot send an
``Authorization`` header from a browser), so they update without a reload.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response

from pipeline.api.auth import Access, acting
from pipeline.api.queues import BrokerQueues, queue_overview
from pipeline.api.views import recent_tasks, task_row, tasks_by_id, worker_row
from pipeline.errors import TaskNotFound
from pipeline.fleet.registry import WorkerNotFound, WorkerState, get_registry
from pipeline.history import History
from pipeline.kinds import KINDS
from pipeline.services import Services
from pipeline.store import State

#: The files the pages load, and their media types; nothing else is served from the package.
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: What a browser may do on these pages: load their own files and call this server, nothing else.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
#: Workers listed on the overview at most (live ones first); the rest are counted.
MAX_WORKERS = 500


def _asset(name: str) -> bytes:
    return resources.files("pipeline.api").joinpath("static", name).read_bytes()


def dashboard_router(services: Services, access: Access, broker: BrokerQueues | None = None) -> APIRouter:
    """The pages (no key) and their data (``access.read``); ``broker`` is shared with ``/api/v1/queues``."""
    router = APIRouter()
    settings = services.settings
    store = services.store
    registry = get_registry(settings)
    broker = broker or BrokerQueues(settings)
    history = History(settings)

    def page() -> HTMLResponse:
        return HTMLResponse(_asset("dashboard.html"), headers=HEADERS)

    for path in (
        "/dashboard",
        "/dashboard/tasks/{item}",
        "/dashboard/workers/{item}",
        "/dashboard/dead/{item}",
    ):
        router.add_api_route(
            path, page, methods=["GET"], include_in_schema=False, response_class=HTMLResponse
        )

    @router.get("/dashboard/assets/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, "no such file")
        return Response(_asset(name), media_type=ASSETS[name], headers=HEADERS)

    @router.get("/api/v1/dashboard", tags=["dashboard"], dependencies=access.read)
    def overview(
        request: Request,
        state: State | None = None,
        kind: str | None = None,
        worker: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        """What the dashboard's overview shows: workers, queues, recent tasks (filtered by
        ``state``, ``kind`` and ``worker``), task counts, and who is looking (name and role)."""
        now = time.time()
        records = registry.list(now)
        shown = records[:MAX_WORKERS]
        current = tasks_by_id(store, (t for r in shown for t in r.current))
        by_state = {s.value: 0 for s in WorkerState}
        for record in records:
            by_state[record.state.value] += 1
        principal = acting(request)
        return {
            "at": now,
            "you": {"name": principal.name, "role": principal.role} if principal else None,
            "workers": [worker_row(r, now, current) for r in shown],
            "workers_by_state": by_state,
            "workers_left_out": len(records) - len(shown),
            "queues": queue_overview(services, broker, registry, now, records),
            "tasks": recent_tasks(store, now, state=state, kind=kind, worker=worker, limit=limit),
            "counts": store.counts(),
            "kinds": sorted(KINDS),
            "thresholds": {
                "stale_after": settings.worker_stale_after,
                "dead_after": settings.worker_dead_after,
            },
        }

    @router.get("/api/v1/dashboard/history", tags=["dashboard"], dependencies=access.read)
    def charts(hours: Annotated[float, Query(gt=0, le=24 * 14)] = 6.0) -> dict[str, Any]:
        """The samples the sweep wrote over the last ``hours``: per task queue, messages waiting,
        dead letters, live processes, and tasks done and failed since the sample before."""
        now = time.time()
        return {"at": now, "since": now - hours * 3600, "points": history.series(now - hours * 3600, now)}

    @router.get("/api/v1/dashboard/tasks/{task_id}", tags=["dashboard"], dependencies=access.read)
    def task_page(task_id: str) -> dict[str, Any]:
        """One task with its events, and its route, reroutes and times as the dashboard shows them."""
        try:
            task = store.get(task_id).to_dict()
        except TaskNotFound:
            raise HTTPException(404, f"no task {task_id}") from None
        return {**task, "row": task_row(task, time.time())}

    @router.get("/api/v1/dashboard/workers/{worker_id}", tags=["dashboard"], dependencies=access.read)
    def worker_page(worker_id: str) -> dict[str, Any]:
        """One worker as the overview shows it, its processes, its history and its latest tasks."""
        now = time.time()
        try:
            record = registry.get(worker_id, now)
        except WorkerNotFound:
            raise HTTPException(404, f"no worker {worker_id}") from None
        current = tasks_by_id(store, record.current)
        return {
            **worker_row(record, now, current),
            "processes_detail": [
                {
                    "session": p.session,
                    "pid": p.pid,
                    "host": p.host,
                    "state": p.state.value,
                    "age_s": round(max(0.0, now - p.last_seen), 1),
                    "current": p.current,
                    "done": p.done,
                    "failed": p.failed,
                    "threads": p.threads,
                }
                for p in record.processes
            ],  # fmt: skip
            "models": record.models,
            "hardware": record.hardware,
            "history": registry.history(worker_id, 50),
            "tasks": recent_tasks(store, now, worker=worker_id, limit=20),
        }

    return router
