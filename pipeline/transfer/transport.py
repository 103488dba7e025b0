"""How a worker fetches inputs and returns outputs.

``Transport`` is the one interface the actors use, one instance per worker
thread; ``LocalTransport`` (``local``) serves workers that see the server's data
directory (same host), held to their tasks' grants, ``SftpTransport``
(``sftp_client``) every other worker, the
threads of a process sharing a small pool of SSH connections (``sftp_pool``).
Every download is
hashed while copied and checked against the reference before it is used;
every upload is written under a temporary name, hashed, and renamed into place
so a reader never sees a partial output.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from pipeline.config import FileAccess, Settings
from pipeline.transfer.checksums import FileRef
from pipeline.transfer.local import LocalTransport, capability_of


class Transport(Protocol):
    def download(self, ref: FileRef, dest: Path) -> Path:
        """Copy a store file to ``dest``, verified; raise ChecksumMismatch if it differs."""

    def upload(self, src: Path, store_path: str) -> FileRef:
        """Put a local file at ``store_path`` atomically and return its verified reference."""

    def read_small(self, store_path: str, limit: int = 1 << 20) -> bytes | None:
        """The content of a small store file (at most ``limit`` bytes), or None if it does not exist.

        Used for a task's output manifest, which tells whether its outputs are complete.
        """

    def authorize(self, task_id: str, grant: str) -> None:
        """Present the task's transfer grant before touching its files (SFTP only)."""

    def forget(self, task_id: str) -> None:
        """The task ended on this worker: its grant is dropped, never presented again (SFTP only)."""

    def close(self) -> None: ...


def open_transport(settings: Settings, queues: Iterable[str] = ()) -> Transport:
    """The transport the configuration asks for, for a worker consuming ``queues``.

    A worker sharing the server's disk is held to its tasks' transfer grants,
    of the one task queue it consumes (grants of either queue when it consumes both).
    """
    if settings.file_access is FileAccess.shared:
        return LocalTransport.from_settings(settings, capability_of(queues))
    if settings.file_access is FileAccess.sftp:
        from pipeline.transfer.sftp_client import SftpTransport

        return SftpTransport(settings)
    raise ValueError(f"unknown file access {settings.file_access}")
