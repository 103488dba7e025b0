"""The file side of ``morag-pipeline server``: the embedded SFTP server and store retention."""

from __future__ import annotations

from pipeline.config import Settings
from pipeline.errors import TaskNotFound
from pipeline.logs import get_logger
from pipeline.security.grants import TaskRouteLookup, TaskStateLookup
from pipeline.security.tokens import TokenStore
from pipeline.store import TaskStore
from pipeline.transfer.local import LocalStore
from pipeline.transfer.retention import RetentionSweeper
from pipeline.transfer.sftp_server import SftpServer, start_sftp_server

logger = get_logger(__name__)


class FileServices:
    """What the server runs for files, stopped together.

    Parameters:
      sftp: the embedded SFTP server, or None when another server serves the store.
      retention: the retention sweeper, or None when files are kept forever.
    """

    def __init__(self, sftp: SftpServer | None, retention: RetentionSweeper | None) -> None:
        self.sftp = sftp
        self.retention = retention

    def stop(self) -> None:
        if self.retention is not None:
            self.retention.stop()
        if self.sftp is not None:
            self.sftp.stop()


def task_state_of(tasks: TaskStore) -> TaskStateLookup:
    """How the SFTP server reads a task's state, to keep its transfer grants open while it is."""

    def state(task_id: str) -> str | None:
        try:
            return str(tasks.get(task_id, events=False).state)
        except TaskNotFound:
            return None

    return state


def task_route_of(tasks: TaskStore) -> TaskRouteLookup:
    """How the SFTP server reads the queue a task is routed to now, to honour a grant after a reroute."""

    def route(task_id: str) -> str | None:
        try:
            queue = tasks.get(task_id, events=False).route.get("queue")
        except TaskNotFound:
            return None
        return str(queue) if queue else None

    return route


def start_file_services(
    settings: Settings, tasks: TaskStore, files: LocalStore, tokens: TokenStore | None = None
) -> FileServices:
    """Start the embedded SFTP server (unless ``sftp_embedded`` is off) and the retention sweeper.

    With ``tokens``, enrolled workers log in to SFTP with their tokens, and a
    task's transfer grant opens its files for as long as ``tasks`` holds the
    task queued or running, to workers of the queue ``tasks`` routes it to.
    """
    sftp = None
    if settings.sftp_embedded:
        sftp = start_sftp_server(settings, files.root, tokens, task_state_of(tasks), task_route_of(tasks))
    if sftp is None:
        logger.info("embedded sftp server off: workers use the configured SFTP server or a shared store")
    retention = None
    if settings.store_retention_hours > 0:
        retention_s = settings.store_retention_hours * 3600
        retention = RetentionSweeper(tasks, files, retention_s, interval_s=min(3600.0, retention_s / 4))
        retention.start()
    return FileServices(sftp, retention)
