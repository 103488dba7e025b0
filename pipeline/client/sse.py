"""Server-sent events, read line by line (the ``text/event-stream`` format), free of I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Event:
    """One event of a task stream.

    Parameters:
      id: the stream's cursor after this event (send it back as ``Last-Event-ID``).
      name: ``progress``, or a stored event: ``submitted``, ``started``, ``rerouted``, ``done``, ...
      data: ``task_id``, ``ts``, ``detail`` (stored events) and ``task``, the task's record then.
    """

    id: str
    name: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return str(self.data.get("task_id"))

    @property
    def task(self) -> dict[str, Any] | None:
        return self.data.get("task")


class EventParser:
    """Turns the lines of a stream into events: ``feed(line)`` returns the event a blank line ends."""

    def __init__(self) -> None:
        self.last_id = ""
        self._name = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if not line:
            if not self._data:
                self._name = ""
                return None
            event = Event(self.last_id, self._name or "message", json.loads("\n".join(self._data)))
            self._name, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self.last_id = value
        elif name == "event":
            self._name = value
        elif name == "data":
            self._data.append(value)
        return None
