"""Task events as server-sent events: one task's, or every task of the caller's API key.

Each message is one stored event (``submitted``, ``published``, ``started``,
``rerouted`` with its reason, ``requeued``, ``done``, ``failed``, ``canceled``,
...) or a ``progress`` message, and carries the task's record as it stands
(without its events). The ``id`` of a message is the stream's cursor,
``<event id>-<progress ms>``: the last stored event sent, and the write time
of the newest progress sent. A client that reconnects with ``Last-Event-ID``
gets every stored event after it and the latest progress of each running
task written since, so it misses nothing; progress values a later one
replaced are not sent again.

The stream reads the database (every replica of the server writes there), so
any replica serves it. It closes after ``timeout`` seconds, or, for one
task's stream, once the task has ended and its last event is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from pipeline.api.auth import Access
from pipeline.errors import TaskNotFound
from pipeline.services import Services
from pipeline.store import FINAL_STATES, Task, TaskStore

#: Seconds between two reads of the database for one stream, when this process writes nothing.
READ_EVERY_S = 0.2
#: Seconds a stream waits at least between two reads (a write of this process wakes it sooner).
MIN_READ_S = 0.02
#: Seconds between two comment lines that keep an idle stream open through proxies.
KEEPALIVE_S = 15.0
#: Progress written up to this long before the cursor is read again (and sent again at most once):
#: a write stamped just before a read may commit just after it.
PROGRESS_OVERLAP_S = 2.0
#: Stored events younger than this wait one more read where their id order may differ from their
#: commit order: on PostgreSQL, and for a key's stream (a task's owner is recorded after its
#: first events).
SETTLE_S = {"task": 0.5, "owner": 2.0}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Timeout = Annotated[float, Query(gt=0, le=3600, description="seconds before the server closes the stream")]
LastId = Annotated[str | None, Header(alias="Last-Event-ID")]
SSE = {200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}}


@dataclass
class Cursor:
    """Where a stream stands: the last stored event sent, the newest progress sent (ms)."""

    event: int = 0
    progress_ms: int = 0

    @classmethod
    def parse(cls, text: str | None) -> Cursor | None:
        """The cursor a ``Last-Event-ID`` names; None when there is none; 400 when malformed."""
        if not text:
            return None
        event, _, progress = text.strip().partition("-")
        if not event.isdigit() or (progress and not progress.isdigit()):
            raise HTTPException(400, f"Last-Event-ID {text!r} is not an id this server sent")
        return cls(int(event), int(progress or 0))

    def __str__(self) -> str:
        return f"{self.event}-{self.progress_ms}"


def message(cursor: Cursor, name: str, data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"id: {cursor}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _record(task: Task) -> dict[str, Any]:
    """The task's record in a message: without its events (the stream sends those one by one)."""
    record = task.to_dict()
    record.pop("events", None)
    return record


class EventReader:
    """Reads what a stream sends next, from the store.

    Parameters:
      store: the task store.
      cursor: where the stream resumes.
      task_ids: the tasks followed; None: every task of ``owner``.
      owner: the API key (its id, or the principal's name) whose tasks are followed.
    """

    def __init__(self, store: TaskStore, cursor: Cursor, task_ids: list[str] | None, owner: str | None):
        self.store = store
        self.cursor = cursor
        self.task_ids = task_ids
        self.owner = owner
        self.sent_progress: set[tuple[str, float]] = set()
        holdback = SETTLE_S["task"] if task_ids is not None else SETTLE_S["owner"]
        self.holdback = 0.0 if task_ids is not None and store.db.dialect == "sqlite" else holdback

    def read(self) -> list[str]:
        """The messages that are due, oldest first; advances the cursor past them."""
        now = time.time()
        found = self.store.events_after(
            self.cursor.event,
            task_ids=self.task_ids,
            owner=self.owner,
            written_before=now - self.holdback if self.holdback else None,
        )
        since = self.cursor.progress_ms / 1000 - PROGRESS_OVERLAP_S
        running = self.store.progress_since(since, task_ids=self.task_ids, owner=self.owner)
        fresh = [t for t in running if (t.id, t.updated_at) not in self.sent_progress]
        records = self.store.records({e["task_id"] for e in found} | {t.id for t in fresh})
        out = []
        for event in found:
            self.cursor.event = event["id"]
            task = records.get(event["task_id"])
            data = {**event, "task": _record(task) if task else None}
            out.append(message(self.cursor, event["event"], data))
        for task in sorted(fresh, key=lambda t: t.updated_at):
            self.sent_progress.add((task.id, task.updated_at))
            self.cursor.progress_ms = max(self.cursor.progress_ms, int(task.updated_at * 1000))
            record = _record(records.get(task.id) or task)
            if record["state"] != "running":
                continue  # it ended meanwhile: its final event says so
            data = {"task_id": task.id, "event": "progress", "ts": task.updated_at, "task": record}
            out.append(message(self.cursor, "progress", data))
        return out

    def ended(self) -> bool:
        """Whether every followed task has ended and its events up to now are sent."""
        if self.task_ids is None:
            return False
        records = self.store.records(self.task_ids)
        if any(r.state not in FINAL_STATES for r in records.values()):
            return False
        return not self.store.events_after(self.cursor.event, task_ids=self.task_ids, limit=1)


async def stream(request: Request, reader: EventReader, timeout: float) -> AsyncIterator[str]:
    """The messages of ``reader`` until the client leaves, ``timeout`` passes or its tasks end."""
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    yield f"retry: 1000\n: cursor {reader.cursor}\n\n"
    with reader.store.db.changes.watch() as changed:
        while time.monotonic() < deadline and not await request.is_disconnected():
            changed.clear()  # a write committed from here on wakes the wait below
            messages = await run_in_threadpool(reader.read)
            for text in messages:
                yield text
            if messages:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            if not messages and await run_in_threadpool(reader.ended):
                return
            # The next read: when this process commits a write, else after READ_EVERY_S (another
            # replica's writes). A burst of writes is read together, at most every MIN_READ_S.
            await asyncio.sleep(MIN_READ_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), READ_EVERY_S - MIN_READ_S)


def events_router(services: Services, access: Access) -> APIRouter:
    """``GET /api/v1/events`` and ``GET /api/v1/tasks/{id}/events``."""
    router = APIRouter(prefix="/api/v1", tags=["events"])
    store = services.store

    def respond(request: Request, reader: EventReader, timeout: float) -> StreamingResponse:
        return StreamingResponse(
            stream(request, reader, timeout), media_type="text/event-stream", headers=STREAM_HEADERS
        )

    @router.get("/tasks/{task_id}/events", dependencies=access.read, responses=SSE)
    def task_events(
        task_id: str, request: Request, timeout: Timeout = 300.0, last_event_id: LastId = None
    ) -> StreamingResponse:
        """One task's events from its first (or after ``Last-Event-ID``), until it ends."""
        try:
            store.get(task_id, events=False)
        except TaskNotFound:
            raise HTTPException(404, f"no task {task_id}") from None
        cursor = Cursor.parse(last_event_id) or Cursor()
        return respond(request, EventReader(store, cursor, [task_id], None), timeout)

    @router.get("/events", dependencies=access.read, responses=SSE)
    def all_events(
        request: Request,
        timeout: Timeout = 300.0,
        task: Annotated[
            list[str] | None, Query(description="only these tasks, from their first event")
        ] = None,
        last_event_id: LastId = None,
    ) -> StreamingResponse:
        """The events of every task the caller's API key submitted, from now (or after
        ``Last-Event-ID``); with ``task``, of those tasks, from their first event."""
        principal = request.state.principal
        owner = principal.key_id or principal.name
        cursor = Cursor.parse(last_event_id)
        if cursor is None:
            cursor = Cursor() if task else Cursor(store.last_event_id(), int(time.time() * 1000))
        return respond(request, EventReader(store, cursor, task, None if task else owner), timeout)

    return router
