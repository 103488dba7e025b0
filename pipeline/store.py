"""The task store: every task's record and its timestamped events, in SQLite (WAL).

Task state lives here from the moment of submit, so the API and the CLI
show what happened even to tasks no worker has seen yet.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pipeline.db import Database
from pipeline.errors import TaskNotFound


class State(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    canceled = "canceled"


FINAL_STATES = frozenset({State.done, State.failed, State.canceled})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    filename TEXT NOT NULL,
    input TEXT NOT NULL,
    options TEXT NOT NULL,
    route TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    outputs TEXT NOT NULL DEFAULT '[]',
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks(created_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL REFERENCES tasks(id),
    ts REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_task ON events(task_id, id);
CREATE TABLE IF NOT EXISTS seen_nonces (nonce TEXT PRIMARY KEY, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS upload_usage (
    key TEXT NOT NULL,
    day INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (key, day)
);
"""

#: Columns added after the first release, with what existing rows get.
_ADDED_COLUMNS = {
    # The outbox: NULL until the task's message is published (existing tasks were).
    "published_at": "REAL",
    "deliveries": "INTEGER NOT NULL DEFAULT 0",
}

#: How long the nonce of an applied message is remembered (a replay within it is a no-op).
NONCE_RETENTION_S = 7 * 24 * 3600.0

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


class TaskStore:
    """Tasks and their events in one SQLite database.

    Parameters:
      path: the database file; its folder is created if missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = Database(path, _SCHEMA)
        self._claims = 0
        with self.db.transaction() as db:
            have = {row["name"] for row in db.execute("PRAGMA table_info(tasks)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE tasks ADD COLUMN {column} {kind}")
                    if column == "published_at":
                        db.execute("UPDATE tasks SET published_at=created_at")

    # Replays. A message's nonce is recorded in the transaction of its effect, so
    # a handler that failed leaves no record and its retry is applied.
    def seen(self, nonce: str) -> bool:
        """Whether a message with this nonce was applied."""
        row = self.db.connect().execute("SELECT 1 FROM seen_nonces WHERE nonce=?", (nonce,)).fetchone()
        return row is not None

    def remember(self, nonce: str) -> bool:
        """Record a nonce on its own (messages with no effect in this store); False if seen before."""
        with self.db.transaction() as db:
            return self._claim(db, nonce)

    def _claim(self, db: sqlite3.Connection, nonce: str | None) -> bool:
        """Record ``nonce`` in the caller's transaction; False when it was applied before."""
        if nonce is None:
            return True
        now = time.time()
        try:
            db.execute("INSERT INTO seen_nonces (nonce, ts) VALUES (?, ?)", (nonce, now))
        except sqlite3.IntegrityError:
            return False
        self._claims += 1
        if self._claims % 500 == 0:
            db.execute("DELETE FROM seen_nonces WHERE ts < ?", (now - NONCE_RETENTION_S,))
        return True

    # Upload quotas: the bytes each API key uploaded on a day (days since the epoch, UTC).
    def uploaded_bytes(self, key: str, day: int) -> int:
        """Bytes ``key`` uploaded on ``day``."""
        row = (
            self.db.connect()
            .execute("SELECT bytes FROM upload_usage WHERE key=? AND day=?", (key, day))
            .fetchone()
        )
        return int(row["bytes"]) if row is not None else 0

    def add_uploaded_bytes(self, key: str, day: int, size: int) -> None:
        """Count ``size`` more bytes uploaded by ``key`` on ``day``; earlier days are forgotten."""
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO upload_usage (key, day, bytes) VALUES (?, ?, ?)"
                " ON CONFLICT (key, day) DO UPDATE SET bytes=bytes+excluded.bytes",
                (key, day, size),
            )
            db.execute("DELETE FROM upload_usage WHERE day < ?", (day,))

    # Writing.
    def create(self, task: Task) -> Task:
        now = time.time()
        task.created_at = task.updated_at = now
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO tasks (id, kind, state, filename, input, options, route,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    task.id,
                    task.kind,
                    task.state,
                    task.filename,
                    json.dumps(task.input),
                    json.dumps(task.options),
                    json.dumps(task.route),
                    now,
                    now,
                ),
            )
            _add_event(db, task.id, now, "submitted", {"route": task.route})
        return task

    def mark_running(self, task_id: str, worker: str, attempt: int, nonce: str | None = None) -> bool:
        """Record that a worker started the task; False if the task already ended."""
        now = time.time()
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return False
            changed = db.execute(
                "UPDATE tasks SET state=?, worker=?, attempts=?, updated_at=?,"
                " started_at=COALESCE(started_at, ?), progress='{}', error=NULL"
                " WHERE id=? AND state IN (?, ?)",
                (State.running, worker, attempt, now, now, task_id, State.queued, State.running),
            ).rowcount
            if changed:
                _add_event(db, task_id, now, "started", {"worker": worker, "attempt": attempt})
        return bool(changed)

    def set_progress(self, task_id: str, progress: dict[str, Any], nonce: str | None = None) -> None:
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return
            db.execute(
                "UPDATE tasks SET progress=?, updated_at=? WHERE id=? AND state=?",
                (json.dumps(progress), time.time(), task_id, State.running),
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
                "UPDATE tasks SET state=?, outputs=?, result=?, worker=?, updated_at=?,"
                " finished_at=?, progress=? WHERE id=? AND state IN (?, ?)",
                (
                    State.done,
                    json.dumps(outputs),
                    json.dumps(result),
                    worker,
                    now,
                    now,
                    json.dumps({"stage": "done", "percent": 100.0}),
                    task_id,
                    State.queued,
                    State.running,
                ),
            ).rowcount
            if changed:
                _add_event(db, task_id, now, "done", {"worker": worker})
        return bool(changed)

    def mark_failed(self, task_id: str, reason: str, worker: str | None, nonce: str | None = None) -> bool:
        """Record the failure and its reason; False (and nothing written) if the task already ended."""
        now = time.time()
        with self.db.transaction() as db:
            if not self._claim(db, nonce):
                return False
            changed = db.execute(
                "UPDATE tasks SET state=?, error=?, worker=COALESCE(?, worker), updated_at=?,"
                " finished_at=? WHERE id=? AND state IN (?, ?)",
                (State.failed, reason, worker, now, now, task_id, State.queued, State.running),
            ).rowcount
            if changed:
                _add_event(db, task_id, now, "failed", {"reason": reason, "worker": worker})
        return bool(changed)

    def mark_canceled(self, task_id: str, reason: str) -> bool:
        """Cancel a queued or running task; False (nothing written) if it already ended.

        Canceled is final: a later completion, failure or start of the task changes nothing.
        """
        now = time.time()
        with self.db.transaction() as db:
            changed = db.execute(
                "UPDATE tasks SET state=?, error=?, updated_at=?, finished_at=?, progress=?"
                " WHERE id=? AND state IN (?, ?)",
                (
                    State.canceled,
                    reason,
                    now,
                    now,
                    json.dumps({"stage": "canceled", "percent": 0.0}),
                    task_id,
                    State.queued,
                    State.running,
                ),
            ).rowcount
            if changed:
                _add_event(db, task_id, now, "canceled", {"reason": reason})
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
                "UPDATE tasks SET state=?, error=NULL, updated_at=?, finished_at=NULL, progress='{}',"
                " published_at=CASE WHEN ? THEN NULL ELSE published_at END"
                " WHERE id=? AND state NOT IN (?, ?)",
                (State.queued, now, unpublished, task_id, State.done, State.canceled),
            ).rowcount
            if changed:
                _add_event(db, task_id, now, "requeued", detail)
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
                row = db.execute("SELECT state, route FROM tasks WHERE id=?", (task_id,)).fetchone()
                if row is None or row["state"] in FINAL_STATES:
                    continue
                route = json.loads(row["route"])
                move = {"from": source, "to": target, "reason": reason, "by": by, "at": now}
                route["queue"] = target
                route["moves"] = [*route.get("moves", []), move]
                route["reasons"] = [*route.get("reasons", []), reason]
                db.execute(
                    "UPDATE tasks SET route=?, updated_at=? WHERE id=?", (json.dumps(route), now, task_id)
                )
                _add_event(db, task_id, now, "rerouted", {k: v for k, v in move.items() if k != "at"})
                recorded += 1
        return recorded

    def mark_published(self, task_id: str, message_id: str, queue: str, by: str) -> bool:
        """Record that the task's message is on ``queue`` (the outbox is cleared); False if it ended."""
        now = time.time()
        with self.db.transaction() as db:
            changed = db.execute(
                "UPDATE tasks SET published_at=?, deliveries=deliveries+1, updated_at=?"
                " WHERE id=? AND state IN (?, ?)",
                (now, now, task_id, State.queued, State.running),
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

    # Reading.
    def get(self, task_id: str, *, events: bool = True) -> Task:
        db = self.db.connect()
        row = db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        if row is None:
            raise TaskNotFound(f"no task {task_id}")
        task = _to_task(row)
        if events:
            task.events = [
                {"ts": e["ts"], "event": e["event"], "detail": json.loads(e["detail"])}
                for e in db.execute(
                    "SELECT ts, event, detail FROM events WHERE task_id=? ORDER BY id", (task_id,)
                )
            ]
        return task

    def list(self, *, state: State | None = None, limit: int = 50, offset: int = 0) -> list[Task]:
        db = self.db.connect()
        if state is None:
            rows = db.execute(
                "SELECT * FROM tasks ORDER BY created_at DESC LIMIT ? OFFSET ?", (limit, offset)
            )
        else:
            rows = db.execute(
                "SELECT * FROM tasks WHERE state=? ORDER BY created_at DESC LIMIT ? OFFSET ?",
                (state, limit, offset),
            )
        return [_to_task(row) for row in rows]

    def unpublished(self, created_before: float) -> list[Task]:
        """Queued tasks whose message was never published, recorded before ``created_before``."""
        rows = self.db.connect().execute(
            "SELECT * FROM tasks WHERE state=? AND published_at IS NULL AND created_at < ?"
            " ORDER BY created_at",
            (State.queued, created_before),
        )
        return [_to_task(row) for row in rows]

    def silent_running(self, updated_before: float) -> list[Task]:
        """Running tasks that no report has touched since ``updated_before``."""
        rows = self.db.connect().execute(
            "SELECT * FROM tasks WHERE state=? AND updated_at < ? ORDER BY updated_at",
            (State.running, updated_before),
        )
        return [_to_task(row) for row in rows]

    def counts(self) -> dict[str, int]:
        db = self.db.connect()
        found = dict(db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())
        return {state.value: found.get(state.value, 0) for state in State}


def _add_event(db: sqlite3.Connection, task_id: str, ts: float, event: str, detail: dict) -> None:
    db.execute(
        "INSERT INTO events (task_id, ts, event, detail) VALUES (?, ?, ?, ?)",
        (task_id, ts, event, json.dumps(detail)),
    )


def _to_task(row: sqlite3.Row) -> Task:
    data = dict(row)
    for column in _JSON_COLUMNS:
        data[column] = json.loads(data[column])
    data["state"] = State(data["state"])
    return Task(**data)
