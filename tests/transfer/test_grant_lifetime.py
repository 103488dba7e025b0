"""A transfer grant lives as long as its task: open while the task is queued or running, whatever
its age, closed once the task ends. A refused old grant never blocks the next task of a worker."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from pipeline.config import Settings
from pipeline.errors import AccessRefused, TaskEnded, TransferError
from pipeline.security.grants import issue_grant
from pipeline.security.tokens import TokenStore
from pipeline.store import State, Task, TaskStore
from pipeline.transfer.checksums import FileRef
from pipeline.transfer.local import LocalStore
from pipeline.transfer.serving import FileServices, task_state_of
from pipeline.transfer.sftp_client import MAX_GRANTS, SftpTransport
from pipeline.transfer.sftp_server import SftpServer, TokenLogins
from tests.conftest import wait_for
from tests.transfer.conftest import SERVER_SECRET, put_input, worker_settings
from tests.transfer.openssh import free_port
from tests.transfer.proxy import CuttingProxy

SECRET = SERVER_SECRET
#: The shortest grant lifetime the settings allow (MORAG_GRANT_TTL_S).
TTL = 60


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "server", sftp_port=free_port(), grant_ttl_s=TTL)


def worker_transport(
    tmp_path: Path, served: FileServices, tokens: TokenStore, port: int | None = None
) -> SftpTransport:
    """An enrolled worker's transport, through ``port`` (a proxy) or straight to the server."""
    assert served.sftp is not None
    token, _ = tokens.issue("gpu-box", "gpu", 3600)
    settings = worker_settings(
        tmp_path,
        port or served.sftp.port,
        worker_token=token,
        sftp_password=None,
        sftp_host_key=served.sftp.fingerprint,
    )
    return SftpTransport(settings)


@pytest.fixture
def worker(tmp_path: Path, served: FileServices, tokens: TokenStore) -> Iterator[SftpTransport]:
    transport = worker_transport(tmp_path, served, tokens)
    yield transport
    transport.close()


def new_task(tasks: TaskStore, files: LocalStore, task_id: str, state: State = State.queued) -> FileRef:
    """A task in the store with its input, as a submit leaves it; then moved to ``state``."""
    ref = put_input(files, task_id, "in.wav", f"RIFF {task_id}".encode())
    tasks.create(Task(task_id, "transcribe", State.queued, "in.wav", ref.to_dict(), {}, {"queue": "gpu"}))
    if state is not State.queued:
        tasks.mark_running(task_id, "gpu-box", 1)
    if state is State.done:
        tasks.mark_done(task_id, [], {}, "gpu-box")
    elif state is State.failed:
        tasks.mark_failed(task_id, "the worker vanished", "gpu-box")
    elif state is State.canceled:
        tasks.mark_canceled(task_id, "canceled by a user")
    assert tasks.get(task_id, events=False).state is state
    return ref


def grant(files: LocalStore, task_id: str, ttl: float = TTL) -> str:
    """A grant as the server signs it; a negative ``ttl`` makes one that expired that long ago."""
    return issue_grant(SECRET, task_id, [files.input_path(task_id, "in.wav")], ttl)


@pytest.mark.parametrize("state", [State.queued, State.running])
def test_grant_of_an_open_task_is_honoured_long_after_it_expired(
    worker: SftpTransport, tasks: TaskStore, files: LocalStore, tmp_path: Path, state: State
) -> None:
    """A task that waited in a backlog longer than MORAG_GRANT_TTL_S still gets its files."""
    ref = new_task(tasks, files, "late", state)
    worker.authorize("late", grant(files, "late", ttl=-10 * TTL))  # expired ten lifetimes ago
    assert worker.download(ref, tmp_path / "in.wav").read_bytes() == b"RIFF late"
    (tmp_path / "out.txt").write_text("transcript")
    uploaded = worker.upload(tmp_path / "out.txt", files.output_path("late", "talk.txt"))
    files.check(uploaded)


@pytest.mark.parametrize("state", [State.done, State.failed, State.canceled])
def test_grant_of_an_ended_task_is_refused_with_the_reason(
    worker: SftpTransport, tasks: TaskStore, files: LocalStore, tmp_path: Path, state: State
) -> None:
    ref = new_task(tasks, files, "over", state)
    worker.session()  # connected: the grant is presented at once
    # Not a refusal of the worker: the task ended, so its message has nothing left to do.
    with pytest.raises(TaskEnded, match=rf"task over has ended \({state}\): its transfer grant is closed"):
        worker.authorize("over", grant(files, "over"))  # a fresh grant: only the task's state refuses it
    with pytest.raises(TransferError, match="refused to read it"):
        worker.download(ref, tmp_path / "in.wav")


def test_expiry_decides_for_a_task_the_server_does_not_know(
    worker: SftpTransport, files: LocalStore, tmp_path: Path
) -> None:
    ref = put_input(files, "stranger", "in.wav", b"RIFF stranger")
    worker.session()
    with pytest.raises(AccessRefused, match=r"transfer grant expired \(task stranger is unknown"):
        worker.authorize("stranger", grant(files, "stranger", ttl=-1))
    worker.authorize("stranger", grant(files, "stranger"))
    assert worker.download(ref, tmp_path / "in.wav").read_bytes() == b"RIFF stranger"


def test_grant_closes_when_its_task_ends_during_the_session(
    worker: SftpTransport, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    ref = new_task(tasks, files, "t1", State.running)
    worker.authorize("t1", grant(files, "t1"))
    assert worker.download(ref, tmp_path / "first").read_bytes() == b"RIFF t1"
    tasks.mark_canceled("t1", "canceled by a user")

    def refused() -> bool:
        try:
            worker.download(ref, tmp_path / "again")
        except TransferError as exc:
            assert "refused to read it" in str(exc)
            return True
        return False

    wait_for("the grant of the canceled task to close", refused, timeout=30)


def test_grant_of_a_task_queued_again_opens_again(
    worker: SftpTransport, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    """A dead-letter retry queues a failed task again: its grant is honoured at once."""
    ref = new_task(tasks, files, "retried", State.failed)
    worker.session()
    with pytest.raises(TaskEnded, match=r"has ended \(failed\)"):
        worker.authorize("retried", grant(files, "retried"))
    assert tasks.requeue("retried", {"by": "test"})
    worker.authorize("retried", grant(files, "retried"))
    assert worker.download(ref, tmp_path / "in.wav").read_bytes() == b"RIFF retried"


def test_forgotten_grant_is_released_on_the_server(
    worker: SftpTransport, tasks: TaskStore, files: LocalStore, tmp_path: Path
) -> None:
    """A worker done with a task keeps no access to it, though the task is still open."""
    ref = new_task(tasks, files, "t2", State.running)
    worker.authorize("t2", grant(files, "t2"))
    worker.download(ref, tmp_path / "first")
    worker.forget("t2")
    with pytest.raises(TransferError, match="refused to read it"):
        worker.download(ref, tmp_path / "again")


def test_reconnect_with_many_refused_old_grants_serves_the_next_task(
    tmp_path: Path,
    served: FileServices,
    tokens: TokenStore,
    tasks: TaskStore,
    files: LocalStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker thread holds grants of tasks that ended or expired meanwhile; the connection is cut;
    the next task's transfers reconnect, the old grants are refused and forgotten, the task is served."""
    assert served.sftp is not None
    proxy = CuttingProxy(served.sftp.port)
    worker = worker_transport(tmp_path, served, tokens, port=proxy.port)
    try:
        ended = [State.done, State.failed, State.canceled]
        old = [f"old{i}" for i in range(MAX_GRANTS - 1)]
        for task_id in old:
            ref = new_task(tasks, files, task_id, State.running)
            worker.authorize(task_id, grant(files, task_id))
            worker.download(ref, tmp_path / f"{task_id}.wav")
        for i, task_id in enumerate(old):  # each ends elsewhere, never forgotten by this worker
            if i % 3 == 0:
                tasks.mark_done(task_id, [], {}, "gpu-box")
            elif i % 3 == 1:
                tasks.mark_failed(task_id, "the worker vanished", "gpu-box")
            else:
                tasks.mark_canceled(task_id, "canceled by a user")
        assert {tasks.get(t, events=False).state for t in old} == set(ended)
        ref = new_task(tasks, files, "next", State.queued)
        worker.authorize("next", grant(files, "next", ttl=-2 * TTL))  # the next task waited too
        assert proxy.cut_now() == 1

        with caplog.at_level(logging.WARNING, logger="pipeline"):
            local = worker.download(ref, tmp_path / "next.wav")
        assert local.read_bytes() == b"RIFF next"
        assert proxy.connections == 2
        forgotten = {
            r.task_id  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage() == "sftp server refused an old transfer grant: forgotten"
        }
        assert forgotten == set(old)

        # Once forgotten they are not presented again: a second cut costs the task nothing.
        caplog.clear()
        assert proxy.cut_now() == 1
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            (tmp_path / "out.txt").write_text("transcript")
            files.check(worker.upload(tmp_path / "out.txt", files.output_path("next", "talk.txt")))
        assert not [r for r in caplog.records if "old transfer grant" in r.getMessage()]
    finally:
        worker.close()
        proxy.close()


def test_store_busy_when_a_grant_is_presented_is_retried_not_failed(
    tmp_path: Path, tasks: TaskStore, files: LocalStore, tokens: TokenStore, host_key: paramiko.PKey
) -> None:
    """The server cannot read the task's state for a moment ("database is locked"): the worker's
    transfer presents the grant again on a new connection, and the task is served."""
    ref = new_task(tasks, files, "busy", State.running)
    busy = {"left": 2}

    def state(task_id: str) -> str | None:
        if busy["left"]:
            busy["left"] -= 1
            raise sqlite3.OperationalError("database is locked")
        return task_state_of(tasks)(task_id)

    logins = TokenLogins(tokens, SECRET, task_state=state)
    with SftpServer(files.root, host_key, logins, "127.0.0.1", 0) as server:
        token, _ = tokens.issue("gpu-box", "gpu", 3600)
        worker = SftpTransport(
            worker_settings(
                tmp_path,
                server.port,
                worker_token=token,
                sftp_password=None,
                sftp_host_key=server.fingerprint,
            )
        )
        try:
            worker.session()
            worker.authorize("busy", grant(files, "busy", ttl=-TTL))  # not refused: taken up again later
            assert worker.download(ref, tmp_path / "in.wav").read_bytes() == b"RIFF busy"
        finally:
            worker.close()
    assert busy["left"] == 0
