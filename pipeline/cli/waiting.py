"""Why a task has not moved, told from what the server's API already shows.

``submit`` asks this when a task stays queued, or its progress stays the same,
for a while, and when ``--timeout`` ends the wait: the registry
(``GET /api/v1/workers``) says which workers serve the task's queue and in
what state they are; the queued tasks (``GET /api/v1/tasks?state=queued``) say
how many wait on that queue and how many came before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.cli.client import ApiClient, ClientError

TaskDict = dict[str, Any]

# The most queued tasks one look fetches; past it the count reads "1000+".
QUEUED_LIMIT = 1000
# Events that are part of every task's life and explain nothing on their own.
ROUTINE_EVENTS = frozenset({"submitted", "published", "started", "progress", "done"})


@dataclass
class Fleet:
    """One look at the server: its workers, how each task queue stands, the tasks that wait.

    Parameters:
      workers: the registry's records (``GET /api/v1/workers``: ``workers``).
      queues: per task queue, ``live`` and ``known`` workers (``GET /api/v1/workers``: ``queues``).
      queued: the tasks in state ``queued``, newest first, at most ``QUEUED_LIMIT``.
      at: when the look was taken (``time.time()``).
    """

    workers: list[dict[str, Any]] = field(default_factory=list)
    queues: dict[str, dict[str, Any]] = field(default_factory=dict)
    queued: list[TaskDict] = field(default_factory=list)
    at: float = 0.0

    def waiting_on(self, queue: str) -> list[TaskDict]:
        return [t for t in self.queued if (t.get("route") or {}).get("queue") == queue]

    def serving(self, queue: str) -> list[dict[str, Any]]:
        return [w for w in self.workers if queue in (w.get("queues") or [])]

    def worker(self, name: str) -> dict[str, Any] | None:
        return next((w for w in self.workers if w.get("id") == name), None)


def _is_live(worker: dict[str, Any]) -> bool:
    return worker.get("state") == "alive" and not worker.get("draining")


def _count(tasks: list[TaskDict], fleet: Fleet) -> str:
    more = "+" if len(fleet.queued) >= QUEUED_LIMIT else ""
    return f"{len(tasks)}{more}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _not_live(workers: list[dict[str, Any]]) -> str:
    """' (cpu-1 dead, cpu-2 draining)': the workers of a queue that exist but take nothing."""
    named = [f"{w['id']} {'draining' if w.get('draining') else w.get('state')}" for w in workers[:3]]
    if len(workers) > 3:
        named.append(f"{len(workers) - 3} more")
    return f" ({', '.join(named)})" if named else ""


def _last_event(task: TaskDict) -> str:
    """'; last event: retrying (database is locked)' when the latest event explains something."""
    events = task.get("events") or []
    if not events or events[-1].get("event") in ROUTINE_EVENTS:
        return ""
    event = events[-1]
    detail = event.get("detail") or {}
    why = detail.get("reason") or detail.get("error")
    return f"; last event: {event['event']}" + (f" ({why})" if why else "")


def why_waiting(task: TaskDict, fleet: Fleet) -> str:
    """One line on why ``task`` (a task record of the API) is not moving, given ``fleet``.

    A queued task: no live worker on its queue, or how many tasks are ahead of
    it and how busy the live workers are. A running task: its worker's state
    and last heartbeat.
    """
    route = task.get("route") or {}
    queue = route.get("queue", "?")
    if task.get("state") == "running":
        return _why_running(task, fleet) + _last_event(task)
    waiting = fleet.waiting_on(queue)
    serving = fleet.serving(queue)
    live = [w for w in serving if _is_live(w)]
    view = fleet.queues.get(queue) or {}
    if not view.get("live", len(live)):  # the server's count (of processes) is the authority
        reason = f"no live {queue} worker{_not_live(serving)}, {_count(waiting, fleet)} waiting on {queue}"
        return reason + _last_event(task)
    created = task.get("created_at") or 0.0
    ahead = [t for t in waiting if t.get("id") != task.get("id") and (t.get("created_at") or 0.0) < created]
    busy = [w for w in live if w.get("threads") and len(w.get("current") or []) >= w["threads"]]
    workers = f"{_plural(len(live) or view['live'], f'live {queue} worker')}, {len(busy)} busy"
    if ahead:
        reason = f"waiting behind {_count(ahead, fleet)} earlier task{'' if len(ahead) == 1 else 's'}"
        reason += f" on {queue} ({workers})"
    else:
        reason = f"first in line on {queue}, not yet started by any worker ({workers})"
    return reason + _last_event(task)


def _why_running(task: TaskDict, fleet: Fleet) -> str:
    name = task.get("worker") or "?"
    stage = (task.get("progress") or {}).get("stage") or "running"
    worker = fleet.worker(name)
    if worker is None:
        return f"{stage} on {name}, a worker the server does not know"
    age = worker.get("age_s")
    heard = f"last heartbeat {age:.0f}s ago" if isinstance(age, int | float) else "no heartbeat"
    if worker.get("state") != "alive":
        return f"its worker {name} is {worker.get('state')} ({heard})"
    return f"no progress reported at {stage} on {name} (alive, {heard})"


class WaitReasons:
    """Says why a task is not moving; one look at the server serves every task for ``refresh_s``.

    Parameters:
      client: the API client ``submit`` uses.
      refresh_s: how long one look at the workers and the queued tasks stays fresh.
      clock: the time source (``time.time``).
    """

    def __init__(self, client: ApiClient, refresh_s: float = 5.0, clock: Callable[[], float] = time.time):
        self.client = client
        self.refresh_s = refresh_s
        self.clock = clock
        self.fleet: Fleet | None = None

    def look(self) -> Fleet:
        now = self.clock()
        if self.fleet is None or now - self.fleet.at >= self.refresh_s:
            listing = self.client.workers()
            queued = self.client.tasks("queued", QUEUED_LIMIT)["tasks"]
            self.fleet = Fleet(listing.get("workers", []), listing.get("queues", {}), queued, now)
        return self.fleet

    def __call__(self, task: TaskDict) -> str:
        try:
            return why_waiting(task, self.look())
        except ClientError as exc:
            return f"cannot ask the server why: {exc}"
