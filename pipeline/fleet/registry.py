"""The worker registry: every worker, its processes' latest heartbeats, their states, and the history.

A worker is a name (``MORAG_WORKER_NAME``, see ``pipeline.identity``); one
``dramatiq`` command with ``--processes N`` is one worker with N processes.
Each process sends its own heartbeats under its own session (a fresh one per
boot), and the registry keeps one record per process. What it shows is the
worker: its processes together.

A process is ``alive`` while its heartbeats arrive, ``stale`` after
``stale_after`` seconds without one, ``dead`` after ``dead_after``, and
``gone`` at once when it says goodbye. A heartbeat brings a stale or dead
process back to ``alive``; a goodbye is final for that process's session.

A worker is in the best state of its processes: ``alive`` while any process
is alive, ``stale`` while the best is stale. Once every process has ended it
is ``gone`` or ``dead`` as its last process ended. So one process's goodbye
removes only that process, and a worker is gone when its last one is.
``state_at`` applies the thresholds to a record, so what is listed is always
current; the sweep (``advance``) writes the transitions and keeps the history.

History: ``joined``, ``revived``, ``draining``, ``stale``, ``dead`` and
``gone`` are the worker's own changes; a process joining or ending while
the worker goes on is ``process joined``, ``process revived``, ``process
stale``, ``process dead`` or ``process gone``.

Records live in tables beside the task store, in the server's database
(``pipeline.schema``): ``workers`` (one row per worker) and ``worker_processes``
(one row per process). A database written before processes were recorded is adopted
when opened: each worker's row becomes its one process.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Table, delete, exists, select, update

from pipeline.config import Settings
from pipeline.db import Database, database_target, dialect_insert
from pipeline.errors import PipelineError
from pipeline.schema import queue_liveness, refused_senders, worker_events, worker_processes, workers

#: Queues that task workers serve.
TASK_QUEUES = ("gpu", "cpu")
#: Records of workers gone or dead longer than this are forgotten (a week).
FORGET_AFTER_S = 7 * 24 * 3600.0
#: Ended processes a live worker keeps on record (dramatiq may restart processes many times).
KEEP_ENDED_PROCESSES = 20


class WorkerState(StrEnum):
    alive = "alive"
    stale = "stale"
    dead = "dead"
    gone = "gone"


ENDED = frozenset({WorkerState.dead, WorkerState.gone})
#: Best first: a worker is in the best state of its processes.
_RANK = {WorkerState.alive: 0, WorkerState.stale: 1, WorkerState.dead: 2, WorkerState.gone: 3}


class WorkerNotFound(PipelineError):
    """No worker has this id."""


class BadHeartbeat(PipelineError):
    """A heartbeat lacks what the registry needs (worker id, session, queues)."""


_JSON = ("queues", "hardware", "models", "current", "speed")


@dataclass
class ProcessRecord:
    """What the registry knows of one process of a worker: one heartbeat session."""

    worker: str
    session: str
    capability: str
    state: WorkerState
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
    skipped: int = 0
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
    def label(self) -> str:
        """How history and reasons name the process: its pid, or its session without one."""
        return f"pid {self.pid}" if self.pid is not None else f"session {self.session[:8]}"


@dataclass
class WorkerRecord:
    """What the registry knows of one worker: its processes, and their sum.

    ``current`` is every task its live processes hold; ``done``, ``failed``
    and ``skipped`` are summed over the processes on record since the worker
    last joined; ``threads`` over its live processes; ``speed`` is their
    sample-weighted mean; ``hardware`` and ``version`` come from the process
    heard from last; ``pid`` is set for a worker of one process only.
    """

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
    processes: list[ProcessRecord] = field(default_factory=list)

    def serves(self, queue: str) -> bool:
        return queue in self.queues

    @property
    def gpus(self) -> list[dict[str, Any]]:
        return list(self.hardware.get("gpus") or [])

    @property
    def live_processes(self) -> list[ProcessRecord]:
        """Processes alive and taking work."""
        return [p for p in self.processes if is_live(p, p.state)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Transition:
    """A worker's change of state, written by the sweep.

    ``process`` is None for the worker's own change; for one process's change
    while the worker goes on in its state, it names that process's session.
    ``current`` is what the worker (or that process) held.
    """

    worker: str
    before: WorkerState
    after: WorkerState
    reason: str
    current: tuple[str, ...] = ()
    process: str | None = None


@dataclass(frozen=True)
class QueueView:
    """How a queue stands: its live processes, and since when it has had none.

    ``live`` counts processes, not workers: each process consumes the queue
    on its own (a GPU process takes one message at a time), so a box started
    with ``--processes 2`` is two units of capacity for routing. ``workers``
    counts the workers (boxes) those processes belong to.
    """

    queue: str
    live: int  # live processes serving the queue
    known: int  # processes of any state on record that served it
    down_since: float | None
    realtime_factor: float | None = None  # median over live processes that measured one
    task_s: float | None = None
    in_flight: int = 0
    workers: int = 0  # live workers (boxes) serving the queue


def state_at(
    record: WorkerRecord | ProcessRecord, now: float, stale_after: float, dead_after: float
) -> WorkerState:
    """The state ``record`` is in at ``now``: thresholds applied to its last heartbeat."""
    if record.state in ENDED:
        return record.state
    age = now - record.last_seen
    if age >= dead_after:
        return WorkerState.dead
    if age >= stale_after:
        return WorkerState.stale
    return WorkerState.alive


def is_live(record: WorkerRecord | ProcessRecord, state: WorkerState) -> bool:
    """Alive and taking work: a draining worker finishes what it holds and takes nothing new."""
    return state is WorkerState.alive and not record.draining


class Registry:
    """Worker records and their history in the server's database.

    Parameters:
      path: the server's database (``pipeline.db.database_target``): its SQLite
        file, a URL, or the settings naming either; shared with the task store.
      stale_after: seconds without a heartbeat before a process is stale.
      dead_after: seconds without a heartbeat before a process is dead.
    """

    def __init__(
        self, path: Path | str | Settings, stale_after: float = 30.0, dead_after: float = 120.0
    ) -> None:
        if dead_after <= stale_after:
            raise ValueError("dead_after must be longer than stale_after")
        self.path = path
        self.stale_after = stale_after
        self.dead_after = dead_after
        self.db = Database(path)
        self._adopt_single_process_records()

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        return cls(database_target(settings), settings.worker_stale_after, settings.worker_dead_after)

    def state_of(self, record: WorkerRecord | ProcessRecord, now: float | None = None) -> WorkerState:
        return state_at(record, time.time() if now is None else now, self.stale_after, self.dead_after)

    def _adopt_single_process_records(self) -> None:
        """Give each worker recorded before processes were (one row, no process) its one process."""
        shared = [workers.c[name] for name in _PROCESS_COLUMNS[1:]]
        orphans = select(workers.c.id, *shared).where(
            ~exists().where(worker_processes.c.worker_id == workers.c.id)
        )
        with self.db.transaction() as db:
            adopt = dialect_insert(db.dialect.name, worker_processes).from_select(_PROCESS_COLUMNS, orphans)
            db.execute(adopt.on_conflict_do_nothing())

    # Messages from workers.
    def heartbeat(self, beat: dict[str, Any], now: float | None = None) -> WorkerRecord | None:
        """Record a heartbeat; None when it is ignored (a session that said goodbye)."""
        now = time.time() if now is None else now
        values = _beat_values(beat)
        worker_id, session = values["id"], values["session"]
        with self.db.transaction() as db:
            row, processes = _load(db, worker_id)
            mine = next((p for p in processes if p.session == session), None)
            if mine is not None and mine.state is WorkerState.gone:
                return None
            before = self._aggregate(row, processes, now) if row is not None else None
            event, detail = None, {}
            if before is None or (before.state in ENDED and mine is None):
                event = "joined"
                detail = {"session": session, "host": values["host"], "pid": values["pid"]}
                db.execute(delete(worker_processes).where(worker_processes.c.worker_id == worker_id))
                processes, mine = [], None  # a new life: earlier processes are history
            elif before.state is not WorkerState.alive:
                event = "revived"
                detail = {"was": before.state.value, "silent_s": round(now - before.last_seen, 1)}
                detail.update(session=session, pid=values["pid"])

            process_event, process_detail = None, {"session": session, "pid": values["pid"]}
            if mine is None:
                joined_at, beats, since = now, 1, now
                process_event = "process joined"
                process_detail["host"] = values["host"]
            else:
                joined_at, beats, since = mine.joined_at, mine.beats + 1, mine.state_since
                was = self.state_of(mine, now)
                if was is not WorkerState.alive:
                    since = now
                    process_event = "process revived"
                    process_detail.update(was=was.value, silent_s=round(now - mine.last_seen, 1))
            process = _to_process(
                {
                    **values,
                    "worker": worker_id,
                    "joined_at": joined_at,
                    "beats": beats,
                    "state": WorkerState.alive,
                    "reason": None,
                    "last_seen": now,
                    "state_since": since,
                }
            )
            _write_process(db, process)
            processes = [p for p in processes if p.session != session] + [process]

            after = self._aggregate(row, processes, now)
            if event is None and after.draining and before is not None and not before.draining:
                event, detail = "draining", {}
            first_seen = row["first_seen"] if row is not None else now
            box = {
                **values,
                "state": WorkerState.alive,
                "reason": None,
                "first_seen": first_seen,
                "joined_at": now if event == "joined" else row["joined_at"],
                "last_seen": now,
                "state_since": now if event in ("joined", "revived") else row["state_since"],
                "beats": after.beats,
            }
            _write_worker(db, box)
            if event:
                _add_event(db, worker_id, now, event, detail)
            if process_event and event not in ("joined", "revived"):
                _add_event(db, worker_id, now, process_event, process_detail)
            return replace(
                after, first_seen=first_seen, joined_at=box["joined_at"], state_since=box["state_since"]
            )

    def goodbye(self, beat: dict[str, Any], now: float | None = None) -> bool:
        """End the process at once; the worker is gone when it was its last. False if already gone."""
        now = time.time() if now is None else now
        values = _beat_values(beat)
        worker_id, session = values["id"], values["session"]
        with self.db.transaction() as db:
            row, processes = _load(db, worker_id)
            mine = next((p for p in processes if p.session == session), None)
            if mine is not None and mine.state is WorkerState.gone:
                return False
            before = self._aggregate(row, processes, now) if row is not None else None
            process = _to_process(
                {
                    **values,
                    "worker": worker_id,
                    "state": WorkerState.gone,
                    "reason": "said goodbye",
                    "current": [],
                    "last_seen": now,
                    "state_since": now,
                    "joined_at": mine.joined_at if mine else now,
                    "beats": mine.beats if mine else 0,
                }
            )
            _write_process(db, process)
            processes = [p for p in processes if p.session != session] + [process]
            after = self._aggregate(row, processes, now)
            left = len([p for p in processes if p.state not in ENDED])
            if after.state is WorkerState.gone and (before is None or before.state is not WorkerState.gone):
                first_seen = row["first_seen"] if row is not None else now
                box = {
                    **values,
                    "state": WorkerState.gone,
                    "reason": "said goodbye",
                    "current": [],
                    "first_seen": first_seen,
                    "joined_at": row["joined_at"] if row is not None else now,
                    "last_seen": now,
                    "state_since": now,
                    "beats": after.beats,
                }
                _write_worker(db, box)
                detail = {
                    "reason": "said goodbye",
                    "done": after.done,
                    "session": session,
                    "pid": values["pid"],
                }
                _add_event(db, worker_id, now, "gone", detail)
            else:
                _add_event(
                    db,
                    worker_id,
                    now,
                    "process gone",
                    {
                        "session": session,
                        "pid": values["pid"],
                        "reason": "said goodbye",
                        "done": values["done"],
                        "processes_left": left,
                    },
                )
        return True

    # Reading.
    def get(self, worker_id: str, now: float | None = None) -> WorkerRecord:
        """The worker and its processes as they stand at ``now``."""
        now = time.time() if now is None else now
        with self.db.read() as db:
            row, processes = _load(db, worker_id, lock=False)
        if row is None:
            raise WorkerNotFound(f"no worker {worker_id}")
        return self._aggregate(row, processes, now)

    def refused(self, worker: str, reason: str, report: str, now: float | None = None) -> None:
        """Count a message of ``worker`` that the server could not verify, with the latest reason.

        A worker whose heartbeats are refused never appears in the registry;
        ``refusals`` is how ``workers`` still shows it, and why.
        """
        now = time.time() if now is None else now
        with self.db.transaction() as db:
            insert = dialect_insert(db.dialect.name, refused_senders).values(
                worker=worker, refused=1, first_at=now, last_at=now, last_reason=reason, last_report=report
            )
            fresh = insert.excluded
            db.execute(
                insert.on_conflict_do_update(
                    index_elements=["worker"],
                    set_={
                        "refused": refused_senders.c.refused + 1,
                        "last_at": fresh.last_at,
                        "last_reason": fresh.last_reason,
                        "last_report": fresh.last_report,
                    },
                )
            )

    def refusals(self, since: float) -> list[dict[str, Any]]:
        """Senders with messages refused since ``since``, the latest first."""
        query = (
            select(refused_senders)
            .where(refused_senders.c.last_at >= since)
            .order_by(refused_senders.c.last_at.desc())
        )
        with self.db.read() as db:
            return [dict(row._mapping) for row in db.execute(query)]

    def history(self, worker_id: str, limit: int = 100) -> list[dict[str, Any]]:
        e = worker_events.c
        query = (
            select(e.ts, e.event, e.detail).where(e.worker_id == worker_id).order_by(e.id.desc()).limit(limit)
        )
        with self.db.read() as db:
            rows = db.execute(query).all()
        return [{"ts": r.ts, "event": r.event, "detail": json.loads(r.detail)} for r in rows][::-1]

    def list(self, now: float | None = None, states: Iterable[str] | None = None) -> list[WorkerRecord]:
        """Every worker with its current state and its processes, live ones first."""
        now = time.time() if now is None else now
        wanted = {WorkerState(s) for s in states} if states else None
        with self.db.read() as db:
            process_rows = [dict(r._mapping) for r in db.execute(select(worker_processes))]
            worker_rows = [dict(r._mapping) for r in db.execute(select(workers))]
        by_worker: dict[str, list[ProcessRecord]] = defaultdict(list)
        for row in process_rows:
            process = _row_process(row)
            by_worker[process.worker].append(process)
        records = []
        for row in worker_rows:
            record = self._aggregate(row, by_worker.get(row["id"], []), now)
            if wanted is None or record.state in wanted:
                records.append(record)
        records.sort(key=lambda r: (_RANK[r.state], r.capability, r.id))
        return records

    def live(self, queue: str, now: float | None = None) -> list[WorkerRecord]:
        """Workers with a process alive, not draining, and consuming ``queue``."""
        now = time.time() if now is None else now
        return [r for r in self.list(now) if any(p.serves(queue) for p in r.live_processes)]

    def views(self, now: float | None = None) -> dict[str, QueueView]:
        """``view`` of every task queue, from one reading of the records."""
        now = time.time() if now is None else now
        records = self.list(now)
        return {queue: self.view(queue, now, records) for queue in TASK_QUEUES}

    def view(
        self, queue: str, now: float | None = None, records: list[WorkerRecord] | None = None
    ) -> QueueView:
        """Live processes of ``queue``, their measured speed, and since when it has had none.

        ``records`` is ``list(now)`` where the caller has it already.
        """
        now = time.time() if now is None else now
        records = self.list(now) if records is None else records
        processes = [p for r in records for p in r.processes if p.serves(queue)]
        live = [p for p in processes if is_live(p, p.state)]
        down_since = None
        if not live:
            with self.db.read() as db:
                row = db.execute(
                    select(queue_liveness.c.down_since).where(queue_liveness.c.queue == queue)
                ).first()
            down_since = row.down_since if row and row.down_since is not None else None
            if down_since is None:
                down_since = self._ended_at(processes, now)
        return QueueView(
            queue=queue,
            live=len(live),
            known=len(processes),
            down_since=down_since,
            realtime_factor=_median([p.speed.get("realtime_factor") for p in live]),
            task_s=_median([p.speed.get("task_s") for p in live]),
            in_flight=sum(len(p.current) for p in live),
            workers=len({p.worker for p in live}),
        )

    def _ended_at(self, processes: list[ProcessRecord], now: float) -> float | None:
        """When the last of ``processes`` stopped being live; None when there were none."""
        ends = []
        for p in processes:
            if p.state is WorkerState.gone:
                ends.append(p.state_since)
            elif p.state is WorkerState.alive:  # draining
                ends.append(now)
            else:
                ends.append(min(now, p.last_seen + self.stale_after))
        return max(ends) if ends else None

    def _aggregate(
        self, row: dict[str, Any] | None, processes: list[ProcessRecord], now: float
    ) -> WorkerRecord:
        """The worker as its processes make it at ``now`` (``row``: the worker's own record)."""
        processes = [self._current(p, now) for p in processes]
        processes.sort(key=lambda p: (_RANK[p.state], p.joined_at, p.session))
        running = [p for p in processes if p.state not in ENDED]
        newest = max(processes, key=lambda p: p.last_seen, default=None)
        if running:
            lead = min(running, key=lambda p: (_RANK[p.state], -p.last_seen))
            state, shown = lead.state, running
        elif processes:
            lead = max(processes, key=lambda p: (p.state_since, p.state is WorkerState.gone))
            state, shown = lead.state, processes
        else:  # cannot happen once adopted; keep the row as it was written
            assert row is not None
            return _row_worker(row, now, self)
        if row is not None and WorkerState(row["state"]) is state:
            since, reason = row["state_since"], row["reason"]
        elif state is WorkerState.alive:
            since, reason = lead.state_since, None
        else:
            since, reason = lead.state_since, lead.reason
        if state is WorkerState.alive:
            reason = None
        assert newest is not None
        capabilities = sorted({p.capability for p in processes})
        return WorkerRecord(
            id=lead.worker,
            session=lead.session,
            capability=capabilities[0] if len(capabilities) == 1 else "+".join(capabilities),
            state=state,
            first_seen=row["first_seen"] if row is not None else lead.joined_at,
            joined_at=row["joined_at"] if row is not None else lead.joined_at,
            last_seen=max(p.last_seen for p in shown),
            state_since=since,
            host=", ".join(sorted({p.host for p in shown if p.host})),
            pid=processes[0].pid if len(processes) == 1 else None,
            queues=sorted({q for p in processes for q in p.queues}),
            threads=sum(p.threads for p in shown),
            hardware=newest.hardware,
            models=sorted({m for p in shown for m in p.models}),
            current=sorted({t for p in shown for t in p.current}),
            done=sum(p.done for p in processes),
            failed=sum(p.failed for p in processes),
            skipped=sum(p.skipped for p in processes),
            speed=_combined_speed(shown),
            draining=bool(running) and all(p.draining for p in running),
            version=newest.version,
            reason=reason,
            sent_at=newest.sent_at,
            booted_at=min((p.booted_at for p in processes if p.booted_at is not None), default=None),
            beats=sum(p.beats for p in processes),
            processes=processes,
        )

    def _current(self, process: ProcessRecord, now: float) -> ProcessRecord:
        """``process`` with its state at ``now``; a state reached by silence dates from its threshold."""
        state = self.state_of(process, now)
        if state is process.state:
            return replace(process)
        threshold = self.stale_after if state is WorkerState.stale else self.dead_after
        reason = _silence(now - process.last_seen)
        return replace(process, state=state, reason=reason, state_since=process.last_seen + threshold)

    # The sweep's part.
    def advance(self, now: float | None = None, consumers: dict[str, int] | None = None) -> list[Transition]:
        """Write every change of state since the last call; returns the changes.

        Thresholds apply to each process. ``consumers`` (consumers per queue,
        from RabbitMQ) lets a process be declared dead at once when no queue
        it serves has a consumer left: its connection is gone, whatever its
        last heartbeat said. A worker changes state when its processes
        together do (every one stale, every one dead); a process that ends
        while others go on is a transition of its own, with ``process`` set.
        """
        now = time.time() if now is None else now
        changes: list[Transition] = []
        grace = min(5.0, self.stale_after)
        with self.db.transaction() as db:
            running = (WorkerState.alive, WorkerState.stale)
            rows = {
                row.id: dict(row._mapping)
                for row in db.execute(select(workers).where(workers.c.state.in_(running)).with_for_update())
            }
            by_worker: dict[str, list[ProcessRecord]] = defaultdict(list)
            for row in db.execute(
                select(worker_processes)
                .join(workers, workers.c.id == worker_processes.c.worker_id)
                .where(workers.c.state.in_(running))
            ):
                process = _row_process(dict(row._mapping))
                by_worker[process.worker].append(process)
            for worker_id, row in rows.items():
                processes = by_worker.get(worker_id, [])
                moved = []
                for process in processes:
                    if process.state in ENDED:
                        continue
                    before = process.state
                    after = self.state_of(process, now)
                    reason = _silence(now - process.last_seen)
                    served = [q for q in process.queues if q in TASK_QUEUES]
                    if (
                        after is not WorkerState.dead
                        and consumers is not None
                        and served
                        and all(consumers.get(q, 1) == 0 for q in served)
                        and now - process.joined_at > grace
                    ):
                        after = WorkerState.dead
                        reason = f"no consumer left on {', '.join(served)}: its connection is gone"
                    if after is before:
                        continue
                    process.state, process.reason, process.state_since = after, reason, now
                    db.execute(
                        update(worker_processes)
                        .where(
                            worker_processes.c.worker_id == worker_id,
                            worker_processes.c.session == process.session,
                        )
                        .values(state=after, reason=reason, state_since=now)
                    )
                    moved.append((process, before, after, reason))
                was = WorkerState(row["state"])
                worker = self._aggregate(row, processes, now)
                if worker.state is not was:
                    reasons = [r for p, _, a, r in moved if a is worker.state]
                    reason = reasons[-1] if reasons else worker.reason or _silence(now - worker.last_seen)
                    db.execute(
                        update(workers)
                        .where(workers.c.id == worker_id)
                        .values(state=worker.state, reason=reason, state_since=now)
                    )
                    # What it held that was not told before: processes ended earlier were.
                    holding = [p for p, *_ in moved] + [p for p in processes if p.state not in ENDED]
                    current = sorted({t for p in holding for t in p.current})
                    _add_event(db, worker_id, now, worker.state.value, {"reason": reason, "current": current})
                    changes.append(Transition(worker_id, was, worker.state, reason, tuple(current)))
                for process, before, after, reason in moved:
                    if worker.state is not was and after is worker.state:
                        continue  # told by the worker's own change
                    left = len(worker.live_processes)
                    detail = {
                        "session": process.session,
                        "pid": process.pid,
                        "reason": reason,
                        "current": process.current,
                        "processes_left": left,
                    }
                    _add_event(db, worker_id, now, f"process {after.value}", detail)
                    changes.append(
                        Transition(
                            worker_id,
                            before,
                            after,
                            f"{process.label}: {reason}; {left} live process(es) left",
                            tuple(process.current),
                            process=process.session,
                        )
                    )
                ended = sorted((p for p in processes if p.state in ENDED), key=lambda p: -p.state_since)
                for process in ended[KEEP_ENDED_PROCESSES:]:
                    db.execute(
                        delete(worker_processes).where(
                            worker_processes.c.worker_id == worker_id,
                            worker_processes.c.session == process.session,
                        )
                    )
            forgotten = (
                workers.c.state.in_((WorkerState.dead, WorkerState.gone)),
                workers.c.state_since < now - FORGET_AFTER_S,
            )
            old = select(workers.c.id).where(*forgotten)
            db.execute(delete(worker_events).where(worker_events.c.worker_id.in_(old)))
            db.execute(delete(worker_processes).where(worker_processes.c.worker_id.in_(old)))
            db.execute(delete(workers).where(*forgotten))
        self._mark_queues(now, consumers, self.list(now))
        return changes

    def _mark_queues(self, now: float, consumers: dict[str, int] | None, every: list[WorkerRecord]) -> None:
        """Remember since when each task queue has had no live process."""
        with self.db.transaction() as db:
            for queue in TASK_QUEUES:
                processes = [p for r in every for p in r.processes if p.serves(queue)]
                live = any(is_live(p, p.state) for p in processes)
                if not processes and consumers is not None:
                    live = consumers.get(queue, 0) > 0  # no heartbeats known: the consumer count decides
                row = db.execute(
                    select(queue_liveness.c.down_since).where(queue_liveness.c.queue == queue)
                ).first()
                if live or row is None or row.down_since is None:
                    since = None if live else self._ended_at(processes, now) or now
                    insert = dialect_insert(db.dialect.name, queue_liveness).values(
                        queue=queue, down_since=since
                    )
                    db.execute(
                        insert.on_conflict_do_update(
                            index_elements=["queue"], set_={"down_since": insert.excluded.down_since}
                        )
                    )


def _silence(seconds: float) -> str:
    return f"no heartbeat for {seconds:.0f}s"


def _median(values: list[Any]) -> float | None:
    found = sorted(float(v) for v in values if isinstance(v, int | float) and v > 0)
    if not found:
        return None
    middle = len(found) // 2
    return found[middle] if len(found) % 2 else (found[middle - 1] + found[middle]) / 2


def _combined_speed(processes: list[ProcessRecord]) -> dict[str, Any]:
    """The processes' speeds as one: each measure weighted by the tasks that measured it."""
    combined: dict[str, Any] = {}
    samples = sum(int(p.speed.get("samples") or 0) for p in processes)
    for name in ("task_s", "realtime_factor"):
        weighted = [
            (float(p.speed[name]), max(1, int(p.speed.get("samples") or 0)))
            for p in processes
            if isinstance(p.speed.get(name), int | float)
        ]
        if weighted:
            total = sum(w for _, w in weighted)
            combined[name] = float(f"{sum(v * w for v, w in weighted) / total:.4g}")
    if combined or samples:
        combined["samples"] = samples
    return combined


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


_WORKER_COLUMNS = (
    "id", "session", "host", "pid", "capability", "queues", "threads", "hardware", "models", "current",
    "done", "failed", "skipped", "speed", "draining", "version", "state", "reason", "first_seen",
    "joined_at", "last_seen", "sent_at", "state_since", "booted_at", "beats",
)  # fmt: skip
#: ``worker_processes`` columns; every one but the first has the same name in ``workers``.
_PROCESS_COLUMNS = (
    "worker_id", "session", "host", "pid", "capability", "queues", "threads", "hardware", "models",
    "current", "done", "failed", "skipped", "speed", "draining", "version", "state", "reason",
    "joined_at", "last_seen", "sent_at", "state_since", "booted_at", "beats",
)  # fmt: skip


def _upsert(db: Connection, table: Table, columns: tuple[str, ...], key: int, values: dict) -> None:
    row = {c: json.dumps(values[c]) if c in _JSON else values[c] for c in columns}
    row["draining"] = int(row["draining"])
    insert = dialect_insert(db.dialect.name, table).values(**row)
    updates = {c: insert.excluded[c] for c in columns[key:]}
    db.execute(insert.on_conflict_do_update(index_elements=list(columns[:key]), set_=updates))


def _write_worker(db: Connection, values: dict[str, Any]) -> None:
    _upsert(db, workers, _WORKER_COLUMNS, 1, values)


def _write_process(db: Connection, process: ProcessRecord) -> None:
    _upsert(db, worker_processes, _PROCESS_COLUMNS, 2, {**asdict(process), "worker_id": process.worker})


def _add_event(db: Connection, worker_id: str, ts: float, event: str, detail: dict) -> None:
    db.execute(
        worker_events.insert().values(worker_id=worker_id, ts=ts, event=event, detail=json.dumps(detail))
    )


def _load(
    db: Connection, worker_id: str, lock: bool = True
) -> tuple[dict[str, Any] | None, list[ProcessRecord]]:
    """A worker's own row and its processes; ``lock``: the row is the caller's until its transaction ends."""
    query = select(workers).where(workers.c.id == worker_id)
    row = db.execute(query.with_for_update() if lock else query).first()
    rows = db.execute(select(worker_processes).where(worker_processes.c.worker_id == worker_id))
    return (dict(row._mapping) if row else None), [_row_process(dict(r._mapping)) for r in rows]


def _to_process(values: dict[str, Any]) -> ProcessRecord:
    names = ProcessRecord.__dataclass_fields__
    return ProcessRecord(**{k: v for k, v in values.items() if k in names})


def _row_process(row: dict[str, Any]) -> ProcessRecord:
    data = dict(row)
    for column in _JSON:
        data[column] = json.loads(data[column])
    data["worker"] = data.pop("worker_id")
    data["state"] = WorkerState(data["state"])
    data["draining"] = bool(data["draining"])
    return ProcessRecord(**data)


def _row_worker(row: dict[str, Any], now: float, registry: Registry) -> WorkerRecord:
    data = dict(row)
    for column in _JSON:
        data[column] = json.loads(data[column])
    data["state"] = WorkerState(data["state"])
    data["draining"] = bool(data["draining"])
    record = WorkerRecord(**data)
    record.state = registry.state_of(record, now)
    return record


_registries: dict[tuple[str, float, float], Registry] = {}
_registries_lock = threading.Lock()


def get_registry(settings: Settings | None = None) -> Registry:
    """This process's registry for ``settings`` (default: the process-wide settings)."""
    from pipeline.config import get_settings

    settings = settings or get_settings()
    key = (str(database_target(settings)), settings.worker_stale_after, settings.worker_dead_after)
    with _registries_lock:
        if key not in _registries:
            _registries[key] = Registry.from_settings(settings)
        return _registries[key]
