"""Time limits that stop while a task waits for a transcription slot."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic

from dramatiq import Broker
from dramatiq.middleware import TimeLimit

from pipeline.processors import slots


class SlotAwareTimeLimit(TimeLimit):
    """Dramatiq's ``TimeLimit``, its clock stopped while a task waits for a transcription slot.

    A GPU worker holds one message more than it transcribes (``WorkerSizing``): that task is
    downloaded and decoded, then waits for the model while the one before it finishes. Its
    time limit is sized for its own work (``pipeline.routing``), not for the task before it;
    while it waits (``slots.Slots.take``), its deadline is put aside, and on its turn it gets
    back the time it had left.

    Parameters: those of Dramatiq's ``TimeLimit``.
    """

    def after_process_boot(self, broker: Broker) -> None:
        super().after_process_boot(broker)
        slots.slots.waiting = self.paused

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The calling thread's time limit, stopped for the block."""
        manager = self.manager
        deadlines = getattr(manager, "deadlines", None)  # gevent's manager keeps none: not paused
        if deadlines is None:
            yield
            return
        thread = threading.get_ident()
        with manager.mu:
            deadline = deadlines.get(thread)
            deadlines[thread] = None
        left = None if deadline is None else deadline - monotonic()
        try:
            yield
        finally:
            if left is not None:
                with manager.mu:
                    deadlines[thread] = monotonic() + max(left, 0.0)
