"""How the server's parts stand, for ``/healthz``.

Parts that run in other threads or processes (the liveness process's sweep)
write when they last worked into the server's database; ``/healthz`` reads it
and asks the in-process parts (the control consumer, the SFTP server, the
broker) directly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pendulum
from periodiq import cron
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.db import Database
from pipeline.schema import server_parts

#: The name the liveness sweep's last run is kept under.
SWEEP_PART = "sweep"


class PartLog:
    """When each part of the server last did its work, in the server's database.

    Parameters:
      db_path: the server's database: its SQLite file, a URL, or the settings naming either.
    """

    def __init__(self, db_path: Path | str | Settings) -> None:
        self.db = Database(db_path)

    def mark(self, name: str, detail: dict[str, Any] | None = None, at: float | None = None) -> None:
        with self.db.transaction() as db:
            insert = self.db.insert(server_parts).values(
                name=name, at=time.time() if at is None else at, detail=json.dumps(detail or {})
            )
            db.execute(
                insert.on_conflict_do_update(
                    index_elements=["name"], set_={"at": insert.excluded.at, "detail": insert.excluded.detail}
                )
            )

    def mark_once(self, name: str, detail: dict[str, Any]) -> None:
        """Record ``detail`` under ``name`` unless something is recorded there already."""
        with self.db.transaction() as db:
            insert = self.db.insert(server_parts).values(name=name, at=time.time(), detail=json.dumps(detail))
            db.execute(insert.on_conflict_do_nothing(index_elements=["name"]))

    def last(self, name: str) -> tuple[float, dict[str, Any]] | None:
        with self.db.read() as db:
            row = db.execute(
                select(server_parts.c.at, server_parts.c.detail).where(server_parts.c.name == name)
            ).first()
        return (row.at, json.loads(row.detail)) if row else None


def sweep_allowance(spec: str) -> float:
    """Seconds after which a missing sweep means the scheduler is down: two cron periods and a minute."""
    first = cron(spec).next_valid_date(pendulum.now())
    period = (cron(spec).next_valid_date(first) - first).total_seconds()
    return 2 * period + 60


@dataclass
class Part:
    """One part's standing: ``ok`` and what was seen."""

    ok: bool
    detail: dict[str, Any]


def report(parts: dict[str, Callable[[], Part]]) -> tuple[bool, dict[str, Any]]:
    """Ask every part; (all ok, the body of ``/healthz``). A check that raises counts as down."""
    body: dict[str, Any] = {}
    healthy = True
    for name, check in parts.items():
        try:
            part = check()
        except Exception as exc:
            part = Part(False, {"error": f"{type(exc).__name__}: {exc}"})
        body[name] = {"ok": part.ok, **part.detail}
        healthy = healthy and part.ok
    return healthy, body
