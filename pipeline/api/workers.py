"""The worker registry over HTTP: ``GET /api/v1/workers``, one worker's record and history, a sweep now."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Any

import dramatiq
from dramatiq import Broker
from fastapi import APIRouter, HTTPException, Query

from pipeline.api.auth import Access
from pipeline.fleet.registry import ProcessRecord, WorkerNotFound, WorkerRecord, WorkerState, get_registry
from pipeline.services import Services

#: How far back ``GET /api/v1/workers`` lists senders whose messages were refused.
REFUSALS_SHOWN_S = 24 * 3600.0


def describe(record: WorkerRecord, now: float, hardware: bool = False) -> dict[str, Any]:
    """A worker's record as the API shows it, with the age of its last heartbeat and its processes.

    ``processes`` lists every process on record (live ones first), each with
    the age of its own last heartbeat; ``live_processes`` counts those taking
    work. Each process's ``hardware`` is left out unless ``hardware``: the
    worker's own is the same machine's.
    """
    processes = [_process(p, now, hardware) for p in record.processes]
    return {
        **record.to_dict(),
        "age_s": _age(now, record.last_seen),
        "processes": processes,
        "live_processes": len(record.live_processes),
    }


def _process(process: ProcessRecord, now: float, hardware: bool) -> dict[str, Any]:
    data = asdict(process)
    if not hardware:
        del data["hardware"]
    return {**data, "age_s": _age(now, process.last_seen)}


def _age(now: float, then: float) -> float:
    return round(max(0.0, now - then), 1)


def workers_router(services: Services, broker: Broker, access: Access) -> APIRouter:
    """Routes over the registry in ``services.settings``' database.

    ``access.read`` guards the listings, ``access.admin`` the sweep, which is
    published through ``broker``.
    """
    router = APIRouter(prefix="/api/v1/workers", tags=["workers"])
    settings = services.settings
    registry = get_registry(settings)

    @router.get("", dependencies=access.read)
    def list_workers(
        state: Annotated[list[WorkerState] | None, Query(description="alive | stale | dead | gone")] = None,
    ) -> dict[str, Any]:
        """Every worker the server has heard from, live ones first, and how each task queue stands.

        A worker is one name: a box started with ``--processes N`` is one
        worker with N ``processes``. A queue's ``live`` counts the live
        processes consuming it (each takes its own messages), ``workers`` the
        workers they belong to.
        """
        now = time.time()
        records = registry.list(now, states=state)
        queues = {}
        for queue, view in registry.views(now).items():
            queues[queue] = {
                "live": view.live,
                "workers": view.workers,
                "known": view.known,
                "down_since": view.down_since,
                "realtime_factor": view.realtime_factor,
                "task_s": view.task_s,
            }
        return {
            "at": now,
            "workers": [describe(r, now) for r in records],
            "queues": queues,
            # Senders whose messages the server could not verify within the last day.
            "refused": registry.refusals(since=now - REFUSALS_SHOWN_S),
            "thresholds": {
                "heartbeat_interval": settings.heartbeat_interval,
                "stale_after": settings.worker_stale_after,
                "dead_after": settings.worker_dead_after,
                "reroute_after": settings.reroute_after,
                "gpu_max_wait": settings.gpu_max_wait,
            },
        }

    @router.post("/sweep", status_code=202, dependencies=access.admin)
    def sweep_now() -> dict[str, Any]:
        """Ask for a sweep now rather than at the next minute; it runs on the server's sweep consumer."""
        from pipeline.actors.fleet import SWEEP_QUEUE

        message = dramatiq.Message(
            queue_name=SWEEP_QUEUE, actor_name="liveness_sweep", args=(), kwargs={}, options={}
        )
        try:
            broker.enqueue(message)
        except Exception as exc:
            raise HTTPException(503, f"cannot reach the broker: {exc}") from None
        return {"message_id": message.message_id, "queue": SWEEP_QUEUE}

    @router.get("/{worker_id}", dependencies=access.read)
    def show_worker(worker_id: str, history: Annotated[int, Query(ge=0, le=1000)] = 100) -> dict[str, Any]:
        """One worker's record, its processes, and its history (joined, stale, dead, revived, gone)."""
        now = time.time()
        try:
            record = registry.get(worker_id, now)
        except WorkerNotFound:
            raise HTTPException(404, f"no worker {worker_id}") from None
        return {**describe(record, now, hardware=True), "history": registry.history(worker_id, history)}

    return router
