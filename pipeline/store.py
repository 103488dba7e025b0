"""The task store: every task's record and its timestamped events, in the server's database.

Task state lives here from the moment of submit, so the API and the CLI
show what happened even to tasks no worker has seen yet.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Row, delete, func, select, update

from pipeline.config import Settings
from pipeline.db import Database
from pipeline.errors import TaskNotFound
from pipeline.schema import events, idempotency_keys, seen_nonces, task_owners, tasks, upload_usage
from pipeline.webhooks import deliveries as webhooks


class State(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    canceled = "canceled"


FINAL_STATES = frozenset({State.done, State.failed, State.canceled})

#: How long the nonce of an applied message is remembered (a replay within it is a no-op).
NONCE_RETENTION_S = 7 * 24 * 3600.0

#: How long an ``Idempotency-Key`` names the task its first submit made.
IDEMPOTENCY_RETENTION_S = 24 * 3600.0
#: How long a key whose first request is still being received holds off the others; past it a
#: request with the key is taken as the first (the server that held it stopped).
IDEMPOTENCY_PENDING_S = 15 * 60.0

_JSON_COLUMNS = ("input", "options", "route", "progress", "outputs", "result")


@dataclass
class Task:
    """One submitted file and everything known about its processing."""

    id: str
    kind: str
    state: State
    filename: str
    input: dict[str, Any]
    options: dict[str, Any]
    route: dict[str, Any]
    progress: dict[str, Any] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    worker: str | None = None
    attempts: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    published_at: float | None = None
    deliveries: int = 0  # messages published for the task: the first, reconciler's re-deliveries
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_task_id() -> str:
    return uuid.uuid4().hex


_LIVE = (State.queued, State.running)

#: What joins a task's id and a chunk's number in the id of a chunk of a long recording
#: (``pipeline.chunks``); no task's own id holds it.
CHUNK_SEPARATOR = "-"


class TaskStore:
    """Tasks and their events in the server's database.

    Parameters:
      path: the SQLite file (its folder is created if missing), a database URL,
        or the settings naming either (``pipeline.db.database_target``).
    """

    def __init__(self, path: Path | str | Settings) -> None:
        self.path = path
        self.db = Database(path)
        self._claims = 0

    # Replays. A message's nonce is recorded in the transaction of its effect, so
    # a handler that failed leaves no record and its retry is applied.
    def seen(self, nonce: str) -> bool:
        """Whether a message with this nonce was applied."""
        with self.db.read() as db:
            row = db.execute(select(seen_nonces.c.nonce).where(seen_nonces.c.nonce == nonce)).first()
        return row is not None

    def remember(self, nonce: str) -> bool:
        """Record a nonce on its own (messages with no effect in this store); False if seen before."""
        with self.db.transaction() as db:
            return self._claim(db, nonce)

    def _claim(self, db: Connection, nonce: str | None) -> bool:
        """Record ``nonce`` in the caller's transaction; False when it was applied before."""
        if nonce is None:
            return True
        now = time.time()
        claim = self.db.insert(seen_nonces).values(nonce=nonce, ts=now).on_conflict_do_nothing()
        # RETURNING says whether the row went in (an INSERT's rowcount is not reported on every driver).
        if db.execute(claim.returning(seen_nonces.c.nonce)).first() is None:
            return False
        self._claims += 1
        if self._claims % 500 == 0:
            db.execute(delete(seen_nonces).where(seen_nonces.c.ts < now - NONCE_RETENTION_S))
        return True

    # Upload quotas: the bytes each API key uploaded on a day (days since the epoch, UTC).
    def uploaded_bytes(self, key: str, day: int) -> int:
        """Bytes ``key`` uploaded on ``day``."""
        with self.db.read() as db:
            found = db.execute(
                select(upload_usage.c.bytes).where(upload_usage.c.key == key, upload_usage.c.day == day)
            ).scalar()
        return int(found) if found is not None else 0

    def add_uploaded_bytes(self, key: str, day: int, size: int) -> None:
        """Count ``size`` more bytes uploaded by ``key`` on ``day``; earlier days are forgotten."""
        with self.db.transaction() as db:
            insert = self.db.insert(upload_usage).values(key=key, day=day, bytes=size)
            db.execute(
                insert.on_conflict_do_update(
                    index_elements=["key", "day"],
                    set_={"bytes": upload_usage.c.bytes + insert.excluded.bytes},
                )
            )
            db.execute(delete(upload_usage).where(upload_usage.c.day < day))

    # Writing.
    def create(self, task: Task, callback: webhooks.Callback | None = None) -> Task:
        """Record a new task, and the webhook its end is POSTed to (``callback``), if any."""
        now = time.time()
        task.created_at = task.updated_at = now
        with self.db.transaction() as db:
            db.execute(
                tasks.insert().values(
                    id=task.id,
                    kind=task.kind,
                    state=task.state,
                    filename=task.filename,
                    input=json.dumps(task.input),
                    options=json.dumps(task.options),
                    route=json.dumps(task.route),
                    created_at=now,
                    updated_at=now,
                )
            )
            _add_event(db, task.id, now, "submitted", {"route": task.route})
            if callback is not None:
                webhooks.register(db, task.id, callback, now)
        return task

    def mark_running(self, task_id: str, worker: str, attempt: int, nonce: str | None = None) -> bool:
        """Record that a worker started the task; False if the task already ended."""
        now = time.time()
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return False
            changed = db.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.state.in_(_LIVE))
                .values(
                    state=State.running,
                    worker=worker,
                    attempts=attempt,
                    updated_at=now,
                    started_at=func.coalesce(tasks.c.started_at, now),
                    progress="{}",
                    error=None,
                )
            ).rowcount
            if changed:
                _add_event(db, task_id, now, "started", {"worker": worker, "attempt": attempt})
        return bool(changed)

    def set_progress(self, task_id: str, progress: dict[str, Any], nonce: str | None = None) -> None:
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return
            db.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.state == State.running)
                .values(progress=json.dumps(progress), updated_at=time.time())
            )

    def mark_done(
        self,
        task_id: str,
        outputs: list[dict[str, Any]],
        result: dict[str, Any],
        worker: str,
        nonce: str | None = None,
    ) -> bool:
        """Record the outputs; False (and nothing written) if the task already ended."""
        now = time.time()
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return False
            changed = db.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.state.in_(_LIVE))
                .values(
                    state=State.done,
                    outputs=json.dumps(outputs),
                    result=json.dumps(result),
                    worker=worker,
                    updated_at=now,
                    finished_at=now,
                    progress=json.dumps({"stage": "done", "percent": 100.0}),
                )
            ).rowcount
            due = bool(changed) and _end(db, task_id, now, "done", {"worker": worker})
        if due:
            webhooks.DUE.set()
        return bool(changed)

    def mark_failed(self, task_id: str, reason: str, worker: str | None, nonce: str | None = None) -> bool:
        """Record the failure and its reason; False (and nothing written) if the task already ended."""
        now = time.time()
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return False
            changed = db.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.state.in_(_LIVE))
                .values(
                    state=State.failed,
                    error=reason,
                    worker=tasks.c.worker if worker is None else worker,
                    updated_at=now,
                    finished_at=now,
                )
            ).rowcount
            due = bool(changed) and _end(db, task_id, now, "failed", {"reason": reason, "worker": worker})
        if due:
            webhooks.DUE.set()
        return bool(changed)

    def mark_canceled(self, task_id: str, reason: str) -> bool:
        """Cancel a queued or running task; False (nothing written) if it already ended.

        Canceled is final: a later completion, failure or start of the task changes nothing.
        """
        now = time.time()
        with self.db.transaction() as db:
            changed = db.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.state.in_(_LIVE))
                .values(
                    state=State.canceled,
                    error=reason,
                    updated_at=now,
                    finished_at=now,
                    progress=json.dumps({"stage": "canceled", "percent": 0.0}),
                )
            ).rowcount
            due = bool(changed) and _end(db, task_id, now, "canceled", {"reason": reason})
        if due:
            webhooks.DUE.set()
        return bool(changed)

    def requeue(self, task_id: str, detail: dict[str, Any], *, unpublished: bool = False) -> bool:
        """Put a task back in ``queued`` for another run, keeping its events.

        Any state but done and canceled: a dead letter's task is usually failed,
        but may still read queued or running if its failure report was lost.
        With ``unpublished`` the task goes back in the outbox too, for whoever
        publishes its next message (the reconciler publishes it if that fails).
        """
        now = time.time()
        with self.db.transaction() as db:
            changed = db.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.state.not_in((State.done, State.canceled)))
                .values(
                    state=State.queued,
                    error=None,
                    updated_at=now,
                    finished_at=None,
                    progress="{}",
                    published_at=None if unpublished else tasks.c.published_at,
                )
            ).rowcount
            if changed:
                _add_event(db, task_id, now, "requeued", detail)
                webhooks.mark_waiting(db, task_id)
        return bool(changed)

    def next_stage(
        self,
        task_id: str,
        kind: str,
        task_input: dict[str, Any],
        route: dict[str, Any],
        detail: dict[str, Any],
        nonce: str | None = None,
    ) -> bool:
        """A stage of the task is over and the next begins: the task becomes a queued, unpublished
        task of ``kind`` with ``task_input`` and ``route``, its history kept, a ``stage done`` event
        with ``detail`` added. False (and nothing written) when the task already ended."""
        now = time.time()
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return False
            changed = db.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.state.in_(_LIVE))
                .values(
                    kind=kind,
                    state=State.queued,
                    input=json.dumps(task_input),
                    route=json.dumps(route),
                    updated_at=now,
                    progress=json.dumps({"stage": f"queued for {kind}", "percent": 0.0}),
                    published_at=None,
                )
            ).rowcount
            if changed:
                _add_event(db, task_id, now, "stage done", detail)
        return bool(changed)

    def await_chunks(
        self,
        task_id: str,
        kind: str,
        task_input: dict[str, Any],
        detail: dict[str, Any],
        nonce: str | None = None,
    ) -> bool:
        """The task was cut into chunks, each a task of its own (``pipeline.chunks``): it becomes a
        running task of ``kind`` with ``task_input`` (which names its chunks) and no message of its
        own, a ``split`` event with ``detail`` added. False (nothing written) when it already ended."""
        now = time.time()
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return False
            changed = db.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.state.in_(_LIVE))
                .values(
                    kind=kind,
                    state=State.running,
                    input=json.dumps(task_input),
                    updated_at=now,
                    started_at=func.coalesce(tasks.c.started_at, now),
                    progress=json.dumps({"stage": "chunks queued", "percent": 0.0}),
                )
            ).rowcount
            if changed:
                _add_event(db, task_id, now, "cut into chunks", detail)
        return bool(changed)

    def reroute(self, moves: Iterable[tuple[str, str, str, str]], by: str, nonce: str | None = None) -> int:
        """Record tasks whose message moved to another queue: (task id, from, to, reason) each.

        The task's route names its new queue and keeps the move; a ``rerouted``
        event says why. Tasks that ended or are unknown are skipped. Returns
        how many were recorded.
        """
        now = time.time()
        recorded = 0
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return 0
            for task_id, source, target, reason in moves:
                row = db.execute(
                    select(tasks.c.state, tasks.c.route).where(tasks.c.id == task_id).with_for_update()
                ).first()
                if row is None or row.state in FINAL_STATES:
                    continue
                route = json.loads(row.route)
                move = {"from": source, "to": target, "reason": reason, "by": by, "at": now}
                route["queue"] = target
                route["moves"] = [*route.get("moves", []), move]
                route["reasons"] = [*route.get("reasons", []), reason]
                db.execute(
                    update(tasks).where(tasks.c.id == task_id).values(route=json.dumps(route), updated_at=now)
                )
                _add_event(db, task_id, now, "rerouted", {k: v for k, v in move.items() if k != "at"})
                recorded += 1
        return recorded

    def mark_published(self, task_id: str, message_id: str, queue: str, by: str) -> bool:
        """Record that the task's message is on ``queue`` (the outbox is cleared); False if it ended."""
        now = time.time()
        with self.db.transaction() as db:
            changed = db.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.state.in_(_LIVE))
                .values(published_at=now, deliveries=tasks.c.deliveries + 1, updated_at=now)
            ).rowcount
            if changed:
                _add_event(
                    db, task_id, now, "published", {"queue": queue, "message_id": message_id, "by": by}
                )
        return bool(changed)

    def add_event(
        self, task_id: str, event: str, detail: dict[str, Any] | None = None, nonce: str | None = None
    ) -> None:
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return
            _add_event(db, task_id, time.time(), event, detail or {})

    # Submitters and idempotent submits.
    def claim_idempotency(self, owner: str, key: str) -> str | None:
        """Hold ``key`` of ``owner`` for a submit being received.

        Returns None when this request is the first with the key (or the key's
        task is older than ``IDEMPOTENCY_RETENTION_S``): it goes on and then calls
        ``bind_idempotency`` or ``release_idempotency``. Returns the task id the
        key made before, or ``""`` while the first request with it is still
        being received.
        """
        now = time.time()
        with self.db.transaction() as db:
            if self._claims % 200 == 0:
                db.execute(
                    delete(idempotency_keys).where(
                        idempotency_keys.c.created_at < now - IDEMPOTENCY_RETENTION_S
                    )
                )
            self._claims += 1
            row = db.execute(
                select(idempotency_keys.c.task_id, idempotency_keys.c.created_at)
                .where(idempotency_keys.c.owner == owner, idempotency_keys.c.key == key)
                .with_for_update()
            ).first()
            if row is not None:
                expired = now - row.created_at > (
                    IDEMPOTENCY_PENDING_S if row.task_id is None else IDEMPOTENCY_RETENTION_S
                )
                if not expired:
                    return row.task_id or ""
                db.execute(
                    delete(idempotency_keys).where(
                        idempotency_keys.c.owner == owner, idempotency_keys.c.key == key
                    )
                )
            claim = self.db.insert(idempotency_keys).values(
                owner=owner, key=key, task_id=None, created_at=now
            )
            if db.execute(claim.on_conflict_do_nothing().returning(idempotency_keys.c.key)).first() is None:
                return ""  # another request took it between the read and the write
        return None

    def bind_idempotency(self, owner: str, key: str, task_id: str) -> None:
        """The submit that held ``key`` made ``task_id``: the key names it from now on."""
        with self.db.transaction() as db:
            db.execute(
                update(idempotency_keys)
                .where(idempotency_keys.c.owner == owner, idempotency_keys.c.key == key)
                .values(task_id=task_id, created_at=time.time())
            )

    def release_idempotency(self, owner: str, key: str) -> None:
        """The submit that held ``key`` made no task: the next request with it is the first."""
        with self.db.transaction() as db:
            db.execute(
                delete(idempotency_keys).where(
                    idempotency_keys.c.owner == owner,
                    idempotency_keys.c.key == key,
                    idempotency_keys.c.task_id.is_(None),
                )
            )

    def set_owner(self, task_id: str, owner: str) -> None:
        """Record who submitted ``task_id`` (its key's event stream follows it)."""
        with self.db.transaction() as db:
            db.execute(
                self.db.insert(task_owners).values(task_id=task_id, owner=owner).on_conflict_do_nothing()
            )

    # Event reads, for the event streams: stored events by id, progress by the time it was written.
    def last_event_id(self) -> int:
        """The id of the newest event of any task (0 when none)."""
        with self.db.read() as db:
            return int(db.execute(select(func.max(_events.c.id))).scalar() or 0)

    def events_after(
        self,
        after: int,
        *,
        task_ids: list[str] | None = None,
        owner: str | None = None,
        written_before: float | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Events with an id above ``after``, oldest first: of ``task_ids``, or of ``owner``'s tasks.

        ``written_before`` leaves out events stamped at or after it (their
        transaction may not be the last one to commit below a later id).
        """
        query = select(_events).where(_events.c.id > after).order_by(_events.c.id).limit(limit)
        query = _of_tasks(query, _events.c.task_id, task_ids, owner)
        if written_before is not None:
            query = query.where(_events.c.ts < written_before)
        with self.db.read() as db:
            return [
                {
                    "id": e.id,
                    "task_id": e.task_id,
                    "ts": e.ts,
                    "event": e.event,
                    "detail": json.loads(e.detail),
                }
                for e in db.execute(query)
            ]

    def progress_since(
        self, since: float, *, task_ids: list[str] | None = None, owner: str | None = None
    ) -> list[Task]:
        """Running tasks (of ``task_ids``, or of ``owner``) written at or after ``since``, without events."""
        query = select(tasks).where(tasks.c.state == State.running, tasks.c.updated_at >= since)
        query = _of_tasks(query, tasks.c.id, task_ids, owner)
        with self.db.read() as db:
            return [_to_task(row) for row in db.execute(query)]

    def records(self, task_ids: Iterable[str]) -> dict[str, Task]:
        """The records of ``task_ids`` that exist, without events, by id."""
        wanted = sorted(set(task_ids))
        if not wanted:
            return {}
        with self.db.read() as db:
            return {row.id: _to_task(row) for row in db.execute(select(tasks).where(tasks.c.id.in_(wanted)))}

    # Reading.
    def get(self, task_id: str, *, events: bool = True) -> Task:
        with self.db.read() as db:
            row = db.execute(select(tasks).where(tasks.c.id == task_id)).first()
            if row is None:
                raise TaskNotFound(f"no task {task_id}")
            task = _to_task(row)
            if events:
                task.events = [
                    {"ts": e.ts, "event": e.event, "detail": json.loads(e.detail)}
                    for e in db.execute(
                        select(_events.c.ts, _events.c.event, _events.c.detail)
                        .where(_events.c.task_id == task_id)
                        .order_by(_events.c.id)
                    )
                ]
        return task

    def list(
        self, *, state: State | None = None, limit: int = 50, offset: int = 0, chunks: bool = False
    ) -> list[Task]:
        """The newest tasks first; the chunks of long recordings (``pipeline.chunks``) only with
        ``chunks``: their task stands for them."""
        query = select(tasks).order_by(tasks.c.created_at.desc()).limit(limit).offset(offset)
        if state is not None:
            query = query.where(tasks.c.state == state)
        if not chunks:
            query = query.where(tasks.c.id.not_like(f"%{CHUNK_SEPARATOR}%"))
        with self.db.read() as db:
            return [_to_task(row) for row in db.execute(query)]

    def unpublished(self, created_before: float) -> list[Task]:
        """Queued tasks whose message was never published, recorded before ``created_before``."""
        return self._tasks_where(
            tasks.c.created_at,
            tasks.c.state == State.queued,
            tasks.c.published_at.is_(None),
            tasks.c.created_at < created_before,
        )

    def waiting(self, updated_before: float) -> list[Task]:
        """Queued tasks whose message was published and that nothing has touched since ``updated_before``."""
        return self._tasks_where(
            tasks.c.updated_at,
            tasks.c.state == State.queued,
            tasks.c.published_at.is_not(None),
            tasks.c.updated_at < updated_before,
        )

    def silent_running(self, updated_before: float) -> list[Task]:
        """Running tasks that no report has touched since ``updated_before``."""
        return self._tasks_where(
            tasks.c.updated_at, tasks.c.state == State.running, tasks.c.updated_at < updated_before
        )

    def _tasks_where(self, order: Any, *conditions: Any) -> list[Task]:
        """The tasks meeting every condition, in ``order``: the reconciler's queries."""
        query = select(tasks).where(*conditions).order_by(order)
        with self.db.read() as db:
            return [_to_task(row) for row in db.execute(query)]

    def counts(self) -> dict[str, int]:
        with self.db.read() as db:
            found = dict(db.execute(select(tasks.c.state, func.count()).group_by(tasks.c.state)).all())
        return {state.value: found.get(state.value, 0) for state in State}


_events = events


def _of_tasks(query, column, task_ids: list[str] | None, owner: str | None):  # type: ignore[no-untyped-def]
    """``query`` narrowed to ``task_ids``, or else to the tasks ``owner`` submitted."""
    if task_ids is not None:
        return query.where(column.in_(task_ids))
    if owner is not None:
        return query.where(column.in_(select(task_owners.c.task_id).where(task_owners.c.owner == owner)))
    return query


def _add_event(db: Connection, task_id: str, ts: float, event: str, detail: dict) -> None:
    db.execute(_events.insert().values(task_id=task_id, ts=ts, event=event, detail=json.dumps(detail)))


def _end(db: Connection, task_id: str, now: float, event: str, detail: dict) -> bool:
    """A task ended, in the transaction that ends it: its event; whether a webhook is now due."""
    _add_event(db, task_id, now, event, detail)
    return webhooks.mark_due(db, task_id, now)


def _to_task(row: Row) -> Task:
    data = dict(row._mapping)
    for column in _JSON_COLUMNS:
        data[column] = json.loads(data[column])
    data["state"] = State(data["state"])
    return Task(**data)
