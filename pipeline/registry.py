"""The worker registry: every worker's latest heartbeat, its state, and its history.

A worker is ``alive`` while its heartbeats arrive, ``stale`` after
``stale_after`` seconds without one, ``dead`` after ``dead_after``, and
``gone`` at once when it says goodbye. A heartbeat brings a stale or dead
worker back to ``alive``; a goodbye is final for that worker's session (a
restarted worker starts a new one). ``state_at`` applies the thresholds to a
record, so what is listed is always current; the sweep writes the transitions
and keeps the history.

Records live in SQLite tables beside the task store, in the server's database.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.db import Database
from pipeline.errors import PipelineError

#: Queues that task workers serve.
TASK_QUEUES = ("gpu", "cpu")
#: Records of workers gone or dead longer than this are forgotten (a week).
FORGET_AFTER_S = 7 * 24 * 3600.0


class WorkerState(StrEnum):
    alive = "alive"
    stale = "stale"
    dead = "dead"
    gone = "gone"


ENDED = frozenset({WorkerState.dead, WorkerState.gone})


class WorkerNotFound(PipelineError):
    """No worker has this id."""


class BadHeartbeat(PipelineError):
    """A heartbeat lacks what the registry needs (worker id, session, queues)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    host TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    capability TEXT NOT NULL,
    queues TEXT NOT NULL DEFAULT '[]',
    threads INTEGER NOT NULL DEFAULT 0,
    hardware TEXT NOT NULL DEFAULT '{}',
    models TEXT NOT NULL DEFAULT '[]',
    current TEXT NOT NULL DEFAULT '[]',
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    speed TEXT NOT NULL DEFAULT '{}',
    draining INTEGER NOT NULL DEFAULT 0,
    version TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT,
    first_seen REAL NOT NULL,
    joined_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    sent_at REAL,
    state_since REAL NOT NULL,
    booted_at REAL,
    beats INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS workers_state ON workers(state);
CREATE TABLE IF NOT EXISTS worker_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_id TEXT NOT NULL,
    ts REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS worker_events_worker ON worker_events(worker_id, id);
CREATE TABLE IF NOT EXISTS queue_liveness (
    queue TEXT PRIMARY KEY,
    down_since REAL
);
"""

_JSON = ("queues", "hardware", "models", "current", "speed")


@dataclass
class WorkerRecord:
    """What the registry knows of one worker."""

    id: str
    session: str
    capability: str
    state: WorkerState
    first_seen: float
    joined_at: float
    last_seen: float
    state_since: float
    host: str = ""
    pid: int | None = None
    queues: list[str] = field(default_factory=list)
    threads: int = 0
    hardware: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    current: list[str] = field(default_factory=list)
    done: int = 0
    failed: int = 0
    skipped: int = 0  # tasks handed on unrun: moved to another queue, canceled, republished
    speed: dict[str, Any] = field(default_factory=dict)
    draining: bool = False
    version: str = ""
    reason: str | None = None
    sent_at: float | None = None
    booted_at: float | None = None
    beats: int = 0

    def serves(self, queue: str) -> bool:
        return queue in self.queues

    @property
    def gpus(self) -> list[dict[str, Any]]:
        return list(self.hardware.get("gpus") or [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Transition:
    """A worker's change of state, written by the sweep."""

    worker: str
    before: WorkerState
    after: WorkerState
    reason: str
    current: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueueView:
    """How a queue stands: its live workers, and since when it has had none."""

    queue: str
    live: int
    known: int  # workers of any state that ever served it
    down_since: float | None
    realtime_factor: float | None = None  # median over live workers that measured one
    task_s: float | None = None
    in_flight: int = 0


def state_at(record: WorkerRecord, now: float, stale_after: float, dead_after: float) -> WorkerState:
    """The state ``record`` is in at ``now``: thresholds applied to its last heartbeat."""
    if record.state in ENDED:
        return record.state
    age = now - record.last_seen
    if age >= dead_after:
        return WorkerState.dead
    if age >= stale_after:
        return WorkerState.stale
    return WorkerState.alive


def is_live(record: WorkerRecord, state: WorkerState) -> bool:
    """Alive and taking work: a draining worker finishes what it holds and takes nothing new."""
    return state is WorkerState.alive and not record.draining


class Registry:
    """Worker records and their history in the server's SQLite database.

    Parameters:
      path: the database file (``Settings.db_path``); shared with the task store.
      stale_after: seconds without a heartbeat before a worker is stale.
      dead_after: seconds without a heartbeat before a worker is dead.
    """

    def __init__(self, path: Path, stale_after: float = 30.0, dead_after: float = 120.0) -> None:
        if dead_after <= stale_after:
            raise ValueError("dead_after must be longer than stale_after")
        self.path = path
        self.stale_after = stale_after
        self.dead_after = dead_after
        self.db = Database(path, _SCHEMA)

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        return cls(settings.db_path, settings.worker_stale_after, settings.worker_dead_after)

    def state_of(self, record: WorkerRecord, now: float | None = None) -> WorkerState:
        return state_at(record, time.time() if now is None else now, self.stale_after, self.dead_after)

    # Messages from workers.
    def heartbeat(self, beat: dict[str, Any], now: float | None = None) -> WorkerRecord | None:
        """Record a heartbeat; None when it is ignored (a session that said goodbye)."""
        now = time.time() if now is None else now
        values = _beat_values(beat)
        with self.db.transaction() as db:
            row = db.execute("SELECT * FROM workers WHERE id=?", (values["id"],)).fetchone()
            old = _to_record(row) if row is not None else None
            if old is not None and old.session == values["session"] and old.state is WorkerState.gone:
                return None
            if old is None or old.session != values["session"]:
                event, detail = "joined", {"session": values["session"], "host": values["host"]}
                values.update(first_seen=old.first_seen if old else now, joined_at=now, beats=1)
            else:
                values.update(first_seen=old.first_seen, joined_at=old.joined_at, beats=old.beats + 1)
                before = state_at(old, now, self.stale_after, self.dead_after)
                event, detail = None, {}
                if before is not WorkerState.alive:
                    silent = round(now - old.last_seen, 1)
                    event, detail = "revived", {"was": before.value, "silent_s": silent}
                elif values["draining"] and not old.draining:
                    event, detail = "draining", {}
            since = now if event in ("joined", "revived") or old is None else old.state_since
            values.update(state=WorkerState.alive, reason=None, last_seen=now, state_since=since)
            _upsert(db, values)
            if event:
                _add_event(db, values["id"], now, event, detail)
        return self.get(values["id"])

    def goodbye(self, beat: dict[str, Any], now: float | None = None) -> bool:
        """Mark the worker gone at once; False if the goodbye is for an older session."""
        now = time.time() if now is None else now
        values = _beat_values(beat)
        with self.db.transaction() as db:
            row = db.execute("SELECT session, state FROM workers WHERE id=?", (values["id"],)).fetchone()
            if row is not None and (row["session"] != values["session"] or row["state"] == WorkerState.gone):
                return False
            if row is None:
                values.update(first_seen=now, joined_at=now, beats=0)
            else:
                old = _to_record(db.execute("SELECT * FROM workers WHERE id=?", (values["id"],)).fetchone())
                values.update(first_seen=old.first_seen, joined_at=old.joined_at, beats=old.beats)
            values.update(
                state=WorkerState.gone, reason="said goodbye", last_seen=now, state_since=now, current=[]
            )
            _upsert(db, values)
            _add_event(db, values["id"], now, "gone", {"reason": "said goodbye", "done": values["done"]})
        return True

    # Reading.
    def get(self, worker_id: str) -> WorkerRecord:
        row = self.db.connect().execute("SELECT * FROM workers WHERE id=?", (worker_id,)).fetchone()
        if row is None:
            raise WorkerNotFound(f"no worker {worker_id}")
        return _to_record(row)

    def history(self, worker_id: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.db.connect().execute(
            "SELECT ts, event, detail FROM worker_events WHERE worker_id=? ORDER BY id DESC LIMIT ?",
            (worker_id, limit),
        )
        return [{"ts": r["ts"], "event": r["event"], "detail": json.loads(r["detail"])} for r in rows][::-1]

    def list(self, now: float | None = None, states: Iterable[str] | None = None) -> list[WorkerRecord]:
        """Every worker with its current state, live ones first."""
        now = time.time() if now is None else now
        wanted = {WorkerState(s) for s in states} if states else None
        records = []
        for row in self.db.connect().execute("SELECT * FROM workers"):
            record = _to_record(row)
            state = self.state_of(record, now)
            if state is not record.state:
                record.state, record.reason = state, _silence(now - record.last_seen)
            if wanted is None or record.state in wanted:
                records.append(record)
        order = {WorkerState.alive: 0, WorkerState.stale: 1, WorkerState.dead: 2, WorkerState.gone: 3}
        records.sort(key=lambda r: (order[r.state], r.capability, r.id))
        return records

    def live(self, queue: str, now: float | None = None) -> list[WorkerRecord]:
        """Workers alive, not draining, and consuming ``queue``."""
        now = time.time() if now is None else now
        return [r for r in self.list(now) if r.serves(queue) and is_live(r, r.state)]

    def views(self, now: float | None = None) -> dict[str, QueueView]:
        """``view`` of every task queue, from one reading of the records."""
        now = time.time() if now is None else now
        records = self.list(now)
        return {queue: self.view(queue, now, records) for queue in TASK_QUEUES}

    def view(
        self, queue: str, now: float | None = None, records: list[WorkerRecord] | None = None
    ) -> QueueView:
        """Live workers of ``queue``, their measured speed, and since when it has had none.

        ``records`` is ``list(now)`` where the caller has it already.
        """
        now = time.time() if now is None else now
        records = [r for r in (self.list(now) if records is None else records) if r.serves(queue)]
        live = [r for r in records if is_live(r, r.state)]
        down_since = None
        if not live:
            row = (
                self.db.connect()
                .execute("SELECT down_since FROM queue_liveness WHERE queue=?", (queue,))
                .fetchone()
            )
            down_since = row["down_since"] if row and row["down_since"] is not None else None
            if down_since is None:
                down_since = self._ended_at(records, now)
        return QueueView(
            queue=queue,
            live=len(live),
            known=len(records),
            down_since=down_since,
            realtime_factor=_median([r.speed.get("realtime_factor") for r in live]),
            task_s=_median([r.speed.get("task_s") for r in live]),
            in_flight=sum(len(r.current) for r in live),
        )

    def _ended_at(self, records: list[WorkerRecord], now: float) -> float | None:
        """When the last of ``records`` stopped being live; None when there were none."""
        ends = []
        for r in records:
            if r.state is WorkerState.gone:
                ends.append(r.state_since)
            elif r.state is WorkerState.alive:  # draining
                ends.append(now)
            else:
                ends.append(min(now, r.last_seen + self.stale_after))
        return max(ends) if ends else None

    # The sweep's part.
    def advance(self, now: float | None = None, consumers: dict[str, int] | None = None) -> list[Transition]:
        """Write every change of state since the last call; returns the changes.

        ``consumers`` (consumers per queue, from RabbitMQ) lets a worker be
        declared dead at once when no queue it serves has a consumer left:
        its connection is gone, whatever its last heartbeat said.
        """
        now = time.time() if now is None else now
        changes: list[Transition] = []
        grace = min(5.0, self.stale_after)
        with self.db.transaction() as db:
            rows = db.execute(
                "SELECT * FROM workers WHERE state IN (?, ?)", (WorkerState.alive, WorkerState.stale)
            )
            for record in [_to_record(row) for row in rows]:
                after = state_at(record, now, self.stale_after, self.dead_after)
                reason = _silence(now - record.last_seen)
                served = [q for q in record.queues if q in TASK_QUEUES]
                if (
                    after is not WorkerState.dead
                    and consumers is not None
                    and served
                    and all(consumers.get(q, 1) == 0 for q in served)
                    and now - record.joined_at > grace
                ):
                    after = WorkerState.dead
                    reason = f"no consumer left on {', '.join(served)}: its connection is gone"
                if after is record.state:
                    continue
                db.execute(
                    "UPDATE workers SET state=?, reason=?, state_since=? WHERE id=?",
                    (after, reason, now, record.id),
                )
                _add_event(db, record.id, now, after.value, {"reason": reason, "current": record.current})
                changes.append(Transition(record.id, record.state, after, reason, tuple(record.current)))
            db.execute(
                "DELETE FROM worker_events WHERE worker_id IN (SELECT id FROM workers WHERE state IN (?, ?)"
                " AND state_since < ?)",
                (WorkerState.dead, WorkerState.gone, now - FORGET_AFTER_S),
            )
            db.execute(
                "DELETE FROM workers WHERE state IN (?, ?) AND state_since < ?",
                (WorkerState.dead, WorkerState.gone, now - FORGET_AFTER_S),
            )
        self._mark_queues(now, consumers, self.list(now))
        return changes

    def _mark_queues(self, now: float, consumers: dict[str, int] | None, every: list[WorkerRecord]) -> None:
        """Remember since when each task queue has had no live worker."""
        with self.db.transaction() as db:
            for queue in TASK_QUEUES:
                records = [r for r in every if r.serves(queue)]
                live = any(is_live(r, r.state) for r in records)
                if not records and consumers is not None:
                    live = consumers.get(queue, 0) > 0  # no heartbeats known: the consumer count decides
                row = db.execute("SELECT down_since FROM queue_liveness WHERE queue=?", (queue,)).fetchone()
                if live:
                    db.execute(
                        "INSERT INTO queue_liveness (queue, down_since) VALUES (?, NULL)"
                        " ON CONFLICT(queue) DO UPDATE SET down_since=NULL",
                        (queue,),
                    )
                elif row is None or row["down_since"] is None:
                    since = self._ended_at(records, now) or now
                    db.execute(
                        "INSERT INTO queue_liveness (queue, down_since) VALUES (?, ?)"
                        " ON CONFLICT(queue) DO UPDATE SET down_since=excluded.down_since",
                        (queue, since),
                    )


def _silence(seconds: float) -> str:
    return f"no heartbeat for {seconds:.0f}s"


def _median(values: list[Any]) -> float | None:
    found = sorted(float(v) for v in values if isinstance(v, int | float) and v > 0)
    if not found:
        return None
    middle = len(found) // 2
    return found[middle] if len(found) % 2 else (found[middle - 1] + found[middle]) / 2


def _beat_values(beat: dict[str, Any]) -> dict[str, Any]:
    """The columns a heartbeat or goodbye fills; BadHeartbeat when it is malformed."""
    try:
        worker, session = str(beat["worker"]), str(beat["session"])
        queues = [str(q) for q in beat.get("queues") or []]
    except (KeyError, TypeError) as exc:
        raise BadHeartbeat(f"heartbeat without {exc}") from None
    if not worker or not session:
        raise BadHeartbeat("heartbeat without worker id or session")

    def number(name: str) -> int:
        value = beat.get(name, 0)
        return int(value) if isinstance(value, int | float) else 0

    capability = str(beat.get("capability") or ("gpu" if "gpu" in queues else "cpu"))
    sent = beat.get("ts")
    return {
        "id": worker,
        "session": session,
        "host": str(beat.get("host") or ""),
        "pid": beat.get("pid") if isinstance(beat.get("pid"), int) else None,
        "capability": capability,
        "queues": queues,
        "threads": number("threads"),
        "hardware": beat.get("hardware") if isinstance(beat.get("hardware"), dict) else {},
        "models": [str(m) for m in beat.get("models") or []],
        "current": [str(t) for t in beat.get("current") or []],
        "done": number("done"),
        "failed": number("failed"),
        "skipped": number("skipped"),
        "speed": beat.get("speed") if isinstance(beat.get("speed"), dict) else {},
        "draining": bool(beat.get("draining")),
        "version": str(beat.get("version") or ""),
        "sent_at": float(sent) if isinstance(sent, int | float) else None,
        "booted_at": beat.get("booted_at") if isinstance(beat.get("booted_at"), int | float) else None,
    }


_COLUMNS = (
    "id", "session", "host", "pid", "capability", "queues", "threads", "hardware", "models", "current",
    "done", "failed", "skipped", "speed", "draining", "version", "state", "reason", "first_seen",
    "joined_at", "last_seen", "sent_at", "state_since", "booted_at", "beats",
)  # fmt: skip


def _upsert(db: sqlite3.Connection, values: dict[str, Any]) -> None:
    row = [json.dumps(values[c]) if c in _JSON else values[c] for c in _COLUMNS]
    updates = ", ".join(f"{c}=excluded.{c}" for c in _COLUMNS[1:])
    db.execute(
        f"INSERT INTO workers ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        f" ON CONFLICT(id) DO UPDATE SET {updates}",
        row,
    )


def _add_event(db: sqlite3.Connection, worker_id: str, ts: float, event: str, detail: dict) -> None:
    db.execute(
        "INSERT INTO worker_events (worker_id, ts, event, detail) VALUES (?, ?, ?, ?)",
        (worker_id, ts, event, json.dumps(detail)),
    )


def _to_record(row: sqlite3.Row) -> WorkerRecord:
    data = dict(row)
    for column in _JSON:
        data[column] = json.loads(data[column])
    data["state"] = WorkerState(data["state"])
    data["draining"] = bool(data["draining"])
    return WorkerRecord(**data)


_registries: dict[tuple[str, float, float], Registry] = {}
_registries_lock = threading.Lock()


def get_registry(settings: Settings | None = None) -> Registry:
    """This process's registry for ``settings`` (default: the process-wide settings)."""
    from pipeline.config import get_settings

    settings = settings or get_settings()
    key = (str(settings.db_path), settings.worker_stale_after, settings.worker_dead_after)
    with _registries_lock:
        if key not in _registries:
            _registries[key] = Registry.from_settings(settings)
        return _registries[key]
