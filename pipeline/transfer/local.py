"""The server's task store on disk, and the transport of workers that share that disk.

Layout under ``<data_dir>/files``::

    tasks/<task_id>/input/<name>     the uploaded file
    tasks/<task_id>/output/<name>    what the worker returned

Paths in messages are relative to the store root; ``resolve`` refuses any that
would leave it. A worker on the server's host reaches the store through
``LocalTransport``, which opens a task's files only to the transfer grant its
message carried, under the rules the SFTP server applies to enrolled workers.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import AccessRefused, BadInput, PipelineError, TaskEnded, TransferError
from pipeline.logs import get_logger
from pipeline.security.audit import audit
from pipeline.security.grants import ENDED, GrantCheck, GrantRefused, SessionGrants, TaskGrant, verify_grant
from pipeline.security.roles import CAPABILITIES
from pipeline.transfer.checksums import FileRef, copy_file_hashed, sha256_file, verify

logger = get_logger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str) -> str:
    """A file name safe to store: no folders, no leading dots, no odd characters."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(".")
    return cleaned[:200] or "upload"


class LocalStore:
    """Task files under one root folder.

    Parameters:
      root: the folder holding ``tasks/``; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        (self.root / "tasks").mkdir(parents=True, exist_ok=True)

    def resolve(self, relpath: str) -> Path:
        """The absolute path of a store path, refusing anything outside the store."""
        if not relpath or relpath.startswith("/") or "\x00" in relpath:
            raise BadInput(f"invalid store path {relpath!r}")
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root):
            raise BadInput(f"store path {relpath!r} leaves the store")
        return path

    @staticmethod
    def input_path(task_id: str, name: str) -> str:
        return f"tasks/{task_id}/input/{safe_name(name)}"

    @staticmethod
    def output_path(task_id: str, name: str) -> str:
        return f"tasks/{task_id}/output/{safe_name(name)}"

    def add_input(self, task_id: str, name: str, src: Path, sha256: str, size: int) -> FileRef:
        """Move an uploaded file into the task's input folder."""
        ref = FileRef(self.input_path(task_id, name), sha256, size)
        dest = self.resolve(ref.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dest)
        return ref

    def output_as_input(self, task_id: str, output: FileRef, name: str) -> FileRef:
        """Make an output of the task its input ``name`` too (a stage's download, the next stage's
        input): a second link to the same file, made again without harm; the output's own name
        stays until the caller removes it."""
        ref = FileRef(self.input_path(task_id, name), output.sha256, output.size)
        source, dest = self.resolve_plain(output.path), self.resolve_plain(ref.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        try:
            os.link(source, dest)
        except OSError:  # a file system without hard links
            shutil.copyfile(source, dest)
        return ref

    def resolve_plain(self, relpath: str) -> Path:
        """``resolve``, refusing a path that passes through a symbolic link on its way.

        Its resolved path must be its own path with ``.`` and ``..`` worked out:
        a link, even one that points inside the store, would let a file stand
        for another task's.
        """
        path = self.resolve(relpath)
        if path != Path(os.path.abspath(self.root / relpath)):
            raise BadInput(f"store path {relpath!r} passes through a symbolic link")
        return path

    def check(self, ref: FileRef) -> None:
        """Hash the stored file; ChecksumMismatch unless it matches the reference.

        BadInput when the file is missing or reached through a symbolic link.
        """
        path = self.resolve_plain(ref.path)
        if not path.is_file():
            raise BadInput(f"{ref.path}: not in the store")
        verify(ref, sha256_file(path), path.stat().st_size)

    def task_dir(self, task_id: str) -> Path:
        return self.resolve(f"tasks/{task_id}")

    def remove_task(self, task_id: str) -> None:
        shutil.rmtree(self.task_dir(task_id), ignore_errors=True)

    def usage(self) -> tuple[int, int]:
        """(number of files, bytes) held by the store."""
        files = size = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    size += os.stat(os.path.join(folder, name)).st_size
                    files += 1
                except FileNotFoundError:
                    continue
        return files, size


def copy_verified(source: Path, ref: FileRef, dest: Path) -> Path:
    """Copy ``source`` to ``dest``, hashed on the way; ChecksumMismatch unless it is ``ref``."""
    sha256, size = copy_file_hashed(source, dest)
    verify(ref, sha256, size)
    return dest


def put_atomically(src: Path, final: Path, store_path: str) -> FileRef:
    """Copy ``src`` to ``final`` under a temporary name, then rename it: no reader sees a part."""
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        sha256, size = copy_file_hashed(src, partial)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return FileRef(store_path, sha256, size)


def capability_of(queues: Iterable[str]) -> str | None:
    """The capability a worker consuming ``queues`` presents grants as: ``gpu`` or ``cpu`` when it
    consumes that one task queue (its delay queue aside), None when it consumes both (``run``'s
    in-process worker) or neither."""
    consumed = {queue.split(".")[0] for queue in queues} & set(CAPABILITIES)
    return consumed.pop() if len(consumed) == 1 else None


def _task_of(store_path: str) -> str | None:
    parts = store_path.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tasks" else None


class LocalTransport:
    """The ``Transport`` of a worker on the server's host: files straight from the server's data
    directory, each reached only through a transfer grant its task's message carried.

    A worker that shares the server's disk could read and write any task's
    files; this transport holds it to the rules the SFTP server holds an
    enrolled worker to (``SessionGrants``): a grant opens its task only if the
    server's secret signed it, it names the task of the message it came with,
    it was issued to this worker's capability (or the task store routes the
    task to it now), and the task store holds its task queued or running.
    Each download and upload is checked again: the path must be a file of a
    task whose grant is held and still open, an input or output to read, an
    output to write. A refusal raises ``AccessRefused`` (a forged or stolen
    grant, a path outside the task) or ``TaskEnded`` (the task is done,
    failed or canceled), as the SFTP transport raises for a refused grant.
    When the store cannot decide now (it is busy, or a reroute is not
    recorded yet) the grant is presented again at the task's first transfer,
    ``attempts`` times with a growing pause, then ``TransferError``.

    Parameters:
      store: the server's task store, as seen from this worker.
      grants: the grants this worker holds, checked as the SFTP server checks them.
      secret: the server secret (to read which task a grant names before it is taken).
      worker: this worker's name, for logs.
      attempts: presentations of a grant the store cannot decide on, before giving up.
      backoff_s: the first pause between two presentations; each one doubles it.
      max_backoff_s: the longest pause.
      sleep: how to pause.
    """

    def __init__(
        self,
        store: LocalStore,
        grants: SessionGrants,
        secret: bytes,
        worker: str = "",
        attempts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.grants = grants
        self.secret = secret
        self.worker = worker
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self._held: dict[str, TaskGrant] = {}  # task id -> grant taken
        self._pending: dict[str, str] = {}  # task id -> grant the store could not decide on yet

    @classmethod
    def from_settings(cls, settings: Settings, capability: str | None = None) -> LocalTransport:
        """The transport of a worker with the server's settings, consuming ``capability``'s queue
        (None: both queues). Grants are checked against the server's task store."""
        from pipeline.identity import worker_id
        from pipeline.security.keys import server_secret
        from pipeline.store import TaskStore
        from pipeline.transfer.serving import task_route_of, task_state_of

        secret = server_secret(settings)
        tasks = TaskStore(settings)
        worker = settings.worker_name or worker_id()
        check = GrantCheck(secret, task_state_of(tasks), task_route_of(tasks))
        return cls(
            LocalStore(settings.files_dir),
            SessionGrants(check, worker, capability),
            secret,
            worker,
            attempts=settings.sftp_attempts,
            backoff_s=settings.sftp_backoff_s,
            max_backoff_s=settings.sftp_max_backoff_s,
        )

    # Transfer grants.
    def authorize(self, task_id: str, grant: str) -> None:
        """Take the grant of the task about to run; AccessRefused or TaskEnded when it never will open.

        A grant the store cannot decide on now is kept and presented again at
        the task's first transfer.
        """
        self._pending.pop(task_id, None)
        try:
            named = verify_grant(self.secret, grant, check_expiry=False).task
        except GrantRefused as exc:
            raise self._grant_refused(task_id, exc) from None
        if named != task_id:
            self._log_refusal(task_id, f"transfer grant of task {named}")
            raise AccessRefused(f"the transfer grant of task {named} does not open task {task_id}")
        reason = self._take(task_id, grant)
        if reason is not None:
            logger.warning(
                "transfer grant not taken yet, presenting it again before the task's files are used",
                extra={"task_id": task_id, "worker": self.worker, "reason": reason},
            )

    def forget(self, task_id: str) -> None:
        """The task ended on this worker: its grant opens nothing any more."""
        self._pending.pop(task_id, None)
        if self._held.pop(task_id, None) is not None:
            self.grants.release(task_id)

    def _take(self, task_id: str, grant: str) -> str | None:
        """Present ``grant``: None once it is taken, or why the store cannot decide on it now."""
        try:
            self._held[task_id] = self.grants.add(grant)
        except GrantRefused as exc:
            if not exc.retryable:
                self._pending.pop(task_id, None)
                raise self._grant_refused(task_id, exc) from None
            self._pending[task_id] = grant
            return str(exc)
        self._pending.pop(task_id, None)
        return None

    def _present_pending(self, task_id: str, store_path: str) -> None:
        """Present a grant the store could not decide on, with pauses, until it is taken or refused."""
        grant = self._pending.get(task_id)
        if grant is None:
            return
        reason = "the task store cannot decide now"
        for attempt in range(1, self.attempts + 1):
            self.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s) * random.uniform(0.5, 1))
            found = self._take(task_id, grant)
            if found is None:
                return
            reason = found
        self._pending.pop(task_id, None)
        raise TransferError(
            f"{store_path}: the transfer grant was not taken after {self.attempts} attempts: {reason}"
        )

    def _grant_refused(self, task_id: str, exc: GrantRefused) -> PipelineError:
        self._held.pop(task_id, None)
        self._log_refusal(task_id, str(exc))
        if ENDED in str(exc):
            return TaskEnded(f"the server's task store says: {exc}")
        return AccessRefused(f"the transfer grant of task {task_id} is refused: {exc}")

    def _log_refusal(self, task_id: str | None, reason: str, path: str | None = None) -> None:
        audit("transfer.refused", worker=self.worker, task=task_id, path=path, reason=reason)
        logger.warning(
            "transfer refused",
            extra={"task_id": task_id, "worker": self.worker, "path": path, "reason": reason},
        )

    # Paths.
    def _reach(self, store_path: str, *, write: bool) -> Path:
        """The local path of ``store_path`` if a grant held opens it (to write: its task's outputs)."""
        path = self.store.resolve_plain(store_path)
        relative = path.relative_to(self.store.root).as_posix()
        task_id = _task_of(relative)
        if task_id is not None:
            self._present_pending(task_id, store_path)
        if self.grants.allows(relative, write=write):
            return path
        raise self._path_refused(store_path, relative, task_id, write)

    def _path_refused(
        self, store_path: str, relative: str, task_id: str | None, write: bool
    ) -> PipelineError:
        """The error that refuses ``store_path``, saying why; a grant found closed is dropped."""
        verb = "write" if write else "read"
        held = self._held.get(task_id) if task_id is not None else None
        if task_id is None:
            reason = "it is no task's file"
        elif held is None:
            reason = f"this worker holds no transfer grant of task {task_id}"
        elif not held.covers(relative, write=write):
            reason = f"the transfer grant of task {task_id} does not let a worker {verb} it"
        else:
            try:  # the grant was open when taken: say why it is closed now
                self.grants.check.check(held, fresh=True)
                reason = f"the transfer grant of task {task_id} is closed"
            except GrantRefused as exc:
                reason = str(exc)
            self._held.pop(held.task, None)
            self.grants.release(held.task)
        self._log_refusal(task_id, reason, store_path)
        if held is not None and ENDED in reason:
            return TaskEnded(f"{store_path}: refused to {verb} it: {reason}")
        return AccessRefused(f"{store_path}: refused to {verb} it: {reason}")

    # Files.
    def download(self, ref: FileRef, dest: Path) -> Path:
        return copy_verified(self._reach(ref.path, write=False), ref, dest)

    def upload(self, src: Path, store_path: str) -> FileRef:
        return put_atomically(src, self._reach(store_path, write=True), store_path)

    def read_small(self, store_path: str, limit: int = 1 << 20) -> bytes | None:
        try:
            with self._reach(store_path, write=False).open("rb") as f:
                return f.read(limit)
        except FileNotFoundError:
            return None

    def close(self) -> None:
        pass
