"""Removes task folders that dead worker processes left behind."""

from __future__ import annotations

from dramatiq import Broker, Middleware, Worker

from pipeline.transfer.tempfiles import remove_leftovers


class TempCleanup(Middleware):
    """At worker boot, removes the temporary task folders of worker processes that died.

    A task's folder (downloaded input, intermediate and output files) is
    removed when the task ends; a process killed mid-task leaves it behind.
    Folders of processes still running are kept (see
    ``pipeline.transfer.tempfiles``).

    Parameters:
      max_age_s: age after which a folder that names no process is removed;
        longer than any task may run.
    """

    def __init__(self, max_age_s: float = 24 * 3600.0) -> None:
        self.max_age_s = max_age_s

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        remove_leftovers(max_age_s=self.max_age_s)
