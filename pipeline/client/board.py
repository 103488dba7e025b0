"""The latest record of each task a client follows, kept from events and reads, free of I/O."""

from __future__ import annotations

from typing import Any

from pipeline.client.sse import Event

TaskDict = dict[str, Any]
#: The states a task does not leave.
FINAL = frozenset({"done", "failed", "canceled"})


class Board:
    """Records of the followed tasks, by id, and the stream's cursor.

    Parameters:
      records: the first record of each task (as ``submit`` or ``status`` returned it).
    """

    def __init__(self, records: dict[str, TaskDict]) -> None:
        self.records = dict(records)
        self.cursor = ""

    @property
    def pending(self) -> list[str]:
        """The tasks that have not ended."""
        return [tid for tid, record in self.records.items() if record.get("state") not in FINAL]

    def apply(self, event: Event) -> bool:
        """Take ``event`` in; whether a followed task's record changed."""
        self.cursor = event.id or self.cursor
        old = self.records.get(event.task_id)
        if old is None:
            return False
        events = list(old.get("events") or [])
        if event.name != "progress":
            seen = {(e.get("ts"), e.get("event")) for e in events}
            if (event.data.get("ts"), event.name) not in seen:
                events.append(
                    {"ts": event.data.get("ts"), "event": event.name, "detail": event.data.get("detail", {})}
                )
        new = {**old, **(event.task or {}), "events": events}
        self.records[event.task_id] = new
        return new != old

    def replace(self, record: TaskDict) -> bool:
        """Take a record read from the server in; whether it changed."""
        old = self.records.get(record["id"])
        self.records[record["id"]] = record
        return record != old
