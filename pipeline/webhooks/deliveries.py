"""Each task's webhook delivery, kept in the server's database.

A task submitted with a ``callback_url`` gets its row in the transaction that
records the task (``register``): ``waiting``. The transaction that ends the task
(done, failed, canceled) makes it ``pending`` and due at once (``mark_due``); a
task sent back to the queue waits again (``mark_waiting``), and its next end is
delivered anew. A server sends a pending delivery only after claiming it
(``DeliveryStore.claim``): an UPDATE that takes the row only where no other
server's claim is current, so with several replicas one sends each try. The
outcome of a try is written by the server that claimed it, for the end it
claimed (``DeliveryStore.finish``).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from sqlalchemy import Connection, case, func, or_, select, update

from pipeline.config import Settings
from pipeline.db import Database
from pipeline.schema import webhook_deliveries

#: Set when a task with a webhook ends in this process: the server's courier looks at once.
DUE = threading.Event()


class Callback(NamedTuple):
    """Where a task's end is POSTed, and the API key (its id) whose webhook secret signs it
    (None: a request without a key, in development mode)."""

    url: str
    key_id: str | None


class WebhookState(StrEnum):
    waiting = "waiting"  # the task has not ended
    pending = "pending"  # the task ended: being sent, or sent again after a failed try
    delivered = "delivered"  # a try got a 2xx answer
    gave_up = "gave_up"  # no 2xx answer within the max age (MORAG_WEBHOOK_MAX_AGE_S)


@dataclass
class Delivery:
    """One task's webhook: where it goes and how its tries went."""

    task_id: str
    url: str
    key_id: str | None
    state: WebhookState
    attempts: int
    created_at: float
    due_since: float | None
    next_attempt_at: float | None
    claimed_until: float | None
    claimed_by: str | None
    last_attempt_at: float | None
    last_status: int | None
    last_error: str | None
    delivered_at: float | None

    @property
    def id(self) -> str:
        """The id of this end's delivery, the same on each of its tries (receivers drop repeats)."""
        return f"{self.task_id}-{round((self.due_since or 0) * 1000)}"

    def view(self) -> dict[str, Any]:
        """What a task's record shows of its webhook: the URL without credentials or query."""
        data = asdict(self)
        for private in ("task_id", "key_id", "claimed_until", "claimed_by", "created_at"):
            data.pop(private)
        data["url"] = shown_url(self.url)
        return data


def shown_url(url: str) -> str:
    """``url`` as logs and records show it: no user, password or query (they may hold tokens)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}{'?…' if parts.query else ''}"


def register(db: Connection, task_id: str, callback: Callback, now: float) -> None:
    """Record the webhook of a task being created, in the transaction that records the task."""
    db.execute(
        webhook_deliveries.insert().values(
            task_id=task_id,
            url=callback.url,
            key_id=callback.key_id,
            state=WebhookState.waiting,
            created_at=now,
        )
    )


def mark_due(db: Connection, task_id: str, now: float) -> bool:
    """The task ended (in the caller's transaction): its webhook is due now, its tries counted
    afresh. False when the task has no webhook."""
    changed = db.execute(
        update(webhook_deliveries)
        .where(webhook_deliveries.c.task_id == task_id)
        .values(
            state=WebhookState.pending,
            attempts=0,
            due_since=now,
            next_attempt_at=now,
            claimed_until=None,
            claimed_by=None,
            last_status=None,
            last_error=None,
            delivered_at=None,
        )
    ).rowcount
    return bool(changed)


def mark_waiting(db: Connection, task_id: str) -> None:
    """The task is queued again (in the caller's transaction): its webhook waits for its next end."""
    db.execute(
        update(webhook_deliveries)
        .where(webhook_deliveries.c.task_id == task_id)
        .values(state=WebhookState.waiting, next_attempt_at=None, claimed_until=None, claimed_by=None)
    )


def _to_delivery(row: Any) -> Delivery:
    data = dict(row._mapping)
    data["state"] = WebhookState(data["state"])
    return Delivery(**data)


class DeliveryStore:
    """Webhook deliveries in the server's database.

    Parameters:
      target: the server's database: its SQLite file, a URL, or the settings naming either.
    """

    def __init__(self, target: Path | str | Settings) -> None:
        self.db = Database(target)

    def get(self, task_id: str) -> Delivery | None:
        """The task's webhook; None when it was submitted without one."""
        with self.db.read() as db:
            row = db.execute(
                select(webhook_deliveries).where(webhook_deliveries.c.task_id == task_id)
            ).first()
        return _to_delivery(row) if row else None

    def claim(self, by: str, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Take up to ``limit`` due deliveries for ``lease_s`` seconds, for server ``by``.

        A row is taken only where no claim is current, by one UPDATE each: two
        servers claiming at once never take the same row.
        """
        c = webhook_deliveries.c
        free = or_(c.claimed_until.is_(None), c.claimed_until < now)
        due = (c.state == WebhookState.pending, c.next_attempt_at <= now, free)
        claimed = []
        with self.db.transaction() as db:
            candidates = db.execute(
                select(c.task_id).where(*due).order_by(c.next_attempt_at).limit(limit)
            ).scalars()
            for task_id in list(candidates):
                taken = db.execute(
                    update(webhook_deliveries)
                    .where(c.task_id == task_id, *due)
                    .values(claimed_until=now + lease_s, claimed_by=by)
                ).rowcount
                if taken:
                    claimed.append(task_id)
            rows = (
                db.execute(select(webhook_deliveries).where(c.task_id.in_(claimed))).all() if claimed else []
            )
        return sorted((_to_delivery(row) for row in rows), key=lambda d: d.next_attempt_at or 0)

    def finish(
        self,
        delivery: Delivery,
        by: str,
        now: float,
        *,
        status: int | None,
        error: str | None,
        next_attempt_at: float | None,
    ) -> WebhookState | None:
        """Record a try of a delivery ``by`` claimed: delivered when ``error`` is None, else sent
        again at ``next_attempt_at`` (None: given up). The state written; None when the
        delivery changed hands or its task was requeued or ended again meanwhile (nothing written).
        """
        if error is None:
            state = WebhookState.delivered
        else:
            state = WebhookState.pending if next_attempt_at is not None else WebhookState.gave_up
        c = webhook_deliveries.c
        with self.db.transaction() as db:
            changed = db.execute(
                update(webhook_deliveries)
                .where(
                    c.task_id == delivery.task_id,
                    c.claimed_by == by,
                    c.state == WebhookState.pending,
                    c.due_since == delivery.due_since,
                )
                .values(
                    state=state,
                    attempts=c.attempts + 1,
                    last_attempt_at=now,
                    last_status=status,
                    last_error=error,
                    delivered_at=now if error is None else None,
                    next_attempt_at=next_attempt_at if state is WebhookState.pending else None,
                    claimed_until=None,
                    claimed_by=None,
                )
            ).rowcount
        return state if changed else None

    def release(self, delivery: Delivery, by: str) -> None:
        """Give back a claim without a try (its task is no longer ended)."""
        c = webhook_deliveries.c
        with self.db.transaction() as db:
            db.execute(
                update(webhook_deliveries)
                .where(c.task_id == delivery.task_id, c.claimed_by == by)
                .values(claimed_until=None, claimed_by=None)
            )

    def next_due(self) -> float | None:
        """When the earliest pending delivery may be claimed (None: none is pending): when it is
        due, or when the claim of the server sending it now runs out."""
        c = webhook_deliveries.c
        free_at = case((c.claimed_until > c.next_attempt_at, c.claimed_until), else_=c.next_attempt_at)
        with self.db.read() as db:
            return db.execute(select(func.min(free_at)).where(c.state == WebhookState.pending)).scalar()

    def counts(self) -> dict[str, int]:
        """Deliveries by state."""
        c = webhook_deliveries.c
        with self.db.read() as db:
            found = dict(db.execute(select(c.state, func.count()).group_by(c.state)).all())
        return {state.value: int(found.get(state.value, 0)) for state in WebhookState}
