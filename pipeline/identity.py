"""Who this worker is."""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Iterable

from pipeline.config import get_settings


def worker_id() -> str:
    """This worker's name: ``MORAG_WORKER_NAME``, or ``<host>:<pid>`` of the command that started it.

    One ``dramatiq ... --processes N`` command is one worker with N
    processes: every process reports the same name, each under its own
    heartbeat session, and the registry shows them together. An enrolled
    worker's name is its token's subject. Without a name, dramatiq's worker
    processes (started by ``multiprocessing`` from the ``dramatiq`` command)
    take the pid of that command, their parent, so the processes of one
    command on one host share a name and two commands on one host do not. A
    process that no ``multiprocessing`` parent started (the server,
    ``morag-pipeline run``) takes its own pid.
    """
    name = get_settings().worker_name
    if name:
        return name
    parent = multiprocessing.parent_process()
    pid = parent.pid if parent is not None and parent.pid is not None else os.getpid()
    return f"{socket.gethostname()}:{pid}"


#: The queues this worker process consumes, recorded at its boot.
_queues: tuple[str, ...] = ()


def record_queues(queues: Iterable[str]) -> None:
    """Remember the queues this worker process consumes (``WorkerSizing`` calls it at boot)."""
    global _queues
    _queues = tuple(sorted(queues))


def worker_queues() -> tuple[str, ...]:
    """The queues this worker process consumes; empty before its boot."""
    return _queues
