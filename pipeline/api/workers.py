"""The worker registry over HTTP: ``GET /api/v1/workers``, one worker's record and history, a sweep now."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any

import dramatiq
from dramatiq import Broker
from fastapi import APIRouter, HTTPException, Query
from fastapi.params import Depends

from pipeline.registry import WorkerNotFound, WorkerRecord, WorkerState, get_registry
from pipeline.services import Services


def describe(record: WorkerRecord, now: float) -> dict[str, Any]:
    """A worker's record as the API shows it, with the age of its last heartbeat."""
    return {**record.to_dict(), "age_s": round(max(0.0, now - record.last_seen), 1)}


def workers_router(
    services: Services,
    broker: Broker,
    read: Sequence[Depends] = (),
    admin: Sequence[Depends] = (),
) -> APIRouter:
    """Routes over the registry in ``services.settings``' database.

    ``read`` guards the listings, ``admin`` the sweep (FastAPI dependencies).
    """
    router = APIRouter(prefix="/api/v1/workers", tags=["workers"])
    settings = services.settings
    registry = get_registry(settings)

    @router.get("", dependencies=list(read))
    def list_workers(
        state: Annotated[list[WorkerState] | None, Query(description="alive | stale | dead | gone")] = None,
    ) -> dict[str, Any]:
        """Every worker the server has heard from, live ones first, and how each task queue stands."""
        now = time.time()
        records = registry.list(now, states=state)
        queues = {}
        for queue, view in registry.views(now).items():
            queues[queue] = {
                "live": view.live,
                "known": view.known,
                "down_since": view.down_since,
                "realtime_factor": view.realtime_factor,
                "task_s": view.task_s,
            }
        return {
            "at": now,
            "workers": [describe(r, now) for r in records],
            "queues": queues,
            "thresholds": {
                "heartbeat_interval": settings.heartbeat_interval,
                "stale_after": settings.worker_stale_after,
                "dead_after": settings.worker_dead_after,
                "reroute_after": settings.reroute_after,
                "gpu_max_wait": settings.gpu_max_wait,
            },
        }

    @router.post("/sweep", status_code=202, dependencies=list(admin))
    def sweep_now() -> dict[str, Any]:
        """Ask for a sweep now rather than at the next minute; it runs on the server's sweep consumer."""
        from pipeline.actors.liveness import SWEEP_QUEUE

        message = dramatiq.Message(
            queue_name=SWEEP_QUEUE, actor_name="liveness_sweep", args=(), kwargs={}, options={}
        )
        try:
            broker.enqueue(message)
        except Exception as exc:
            raise HTTPException(503, f"cannot reach the broker: {exc}") from None
        return {"message_id": message.message_id, "queue": SWEEP_QUEUE}

    @router.get("/{worker_id}", dependencies=list(read))
    def show_worker(worker_id: str, history: Annotated[int, Query(ge=0, le=1000)] = 100) -> dict[str, Any]:
        """One worker's record and its history (joined, stale, dead, revived, gone)."""
        now = time.time()
        try:
            record = registry.get(worker_id)
        except WorkerNotFound:
            raise HTTPException(404, f"no worker {worker_id}") from None
        state = registry.state_of(record, now)
        if state is not record.state:
            record.state = state
        return {**describe(record, now), "history": registry.history(worker_id, history)}

    return router
