"""Per-task transfer grants on the embedded SFTP server: a worker reaches only the tasks it was sent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from pipeline.errors import AccessRefused, PipelineError, TransferError
from pipeline.security.grants import issue_grant
from pipeline.security.tokens import TokenStore
from pipeline.transfer.local import LocalStore
from pipeline.transfer.sftp_client import SftpTransport
from pipeline.transfer.sftp_server import SftpServer, TokenLogins
from tests.transfer.conftest import put_input, worker_settings

SECRET = b"g" * 48


@pytest.fixture
def tokens(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "server" / "tasks.db", SECRET)


@pytest.fixture
def server(store: LocalStore, host_key: paramiko.PKey, tokens: TokenStore) -> Iterator[SftpServer]:
    with SftpServer(store.root, host_key, TokenLogins(tokens, SECRET), "127.0.0.1", 0) as running:
        yield running


def transport(tmp_path: Path, server: SftpServer, token: str) -> SftpTransport:
    settings = worker_settings(
        tmp_path, server.port, worker_token=token, sftp_password=None, sftp_host_key=server.fingerprint
    )
    return SftpTransport(settings)


def grant(
    task_id: str, store: LocalStore, name: str = "in.wav", ttl: float = 600, secret: bytes = SECRET
) -> str:
    return issue_grant(secret, task_id, [store.input_path(task_id, name)], ttl)


@pytest.fixture
def worker(tmp_path: Path, server: SftpServer, tokens: TokenStore) -> Iterator[SftpTransport]:
    token, _ = tokens.issue("gpu-box", "gpu", 3600)
    t = transport(tmp_path, server, token)
    yield t
    t.close()


def test_a_grant_opens_its_task_and_nothing_else(
    worker: SftpTransport, store: LocalStore, tmp_path: Path
) -> None:
    mine = put_input(store, "task-a", "in.wav", b"RIFF mine")
    theirs = put_input(store, "task-b", "in.wav", b"RIFF theirs")
    with pytest.raises(TransferError, match="refused to read it"):  # no grant yet: nothing is reachable
        worker.download(mine, tmp_path / "x")

    worker.authorize("task-a", grant("task-a", store))
    assert worker.download(mine, tmp_path / "mine").read_bytes() == b"RIFF mine"
    (tmp_path / "out.txt").write_text("transcript")
    ref = worker.upload(tmp_path / "out.txt", store.output_path("task-a", "talk.txt"))
    store.check(ref)

    with pytest.raises(TransferError, match="task-b/input/in.wav: the SFTP server refused to read it"):
        worker.download(theirs, tmp_path / "theirs")  # another task's input
    with pytest.raises(TransferError, match="task-b/output/talk.txt: the SFTP server refused to write it"):
        worker.upload(tmp_path / "out.txt", store.output_path("task-b", "talk.txt"))  # its outputs
    with pytest.raises(TransferError, match="task-a/input/in.wav: the SFTP server refused to write it"):
        worker.upload(tmp_path / "out.txt", store.input_path("task-a", "in.wav"))  # inputs are read-only
    assert store.resolve(theirs.path).read_bytes() == b"RIFF theirs"
    assert not store.resolve(store.output_path("task-b", "talk.txt")).exists()


def test_listing_other_tasks_is_refused(worker: SftpTransport, store: LocalStore) -> None:
    put_input(store, "task-a", "in.wav", b"RIFF")
    put_input(store, "task-secret", "in.wav", b"RIFF")
    worker.authorize("task-a", grant("task-a", store))
    with pytest.raises(PermissionError):
        worker.session().sftp.listdir("/tasks")
    with pytest.raises(PermissionError):
        worker.session().sftp.stat("/tasks/task-secret/input/in.wav")
    assert worker.session().sftp.stat("/tasks/task-a/input/in.wav").st_size == 4


@pytest.mark.parametrize(
    ("case", "make", "reason"),
    [
        ("expired", lambda store: grant("task-a", store, ttl=-5), "transfer grant expired"),
        ("forged", lambda store: grant("task-a", store, secret=b"x" * 48), "Signature verification failed"),
        ("not a grant", lambda store: "a.b.c", "invalid transfer grant"),
    ],
)
def test_bad_grants_are_refused(
    worker: SftpTransport, store: LocalStore, case: str, make, reason: str
) -> None:  # type: ignore[no-untyped-def]
    put_input(store, "task-a", "in.wav", b"RIFF")
    worker.session()  # connected: the grant is presented at once
    with pytest.raises(AccessRefused, match=reason):
        worker.authorize("task-a", make(store))


def test_grant_expiring_mid_task_closes_the_task_without_a_task_store(
    worker: SftpTransport, store: LocalStore, tmp_path: Path
) -> None:
    ref = put_input(store, "task-a", "in.wav", b"RIFF")
    worker.authorize("task-a", grant("task-a", store, ttl=2))
    worker.download(ref, tmp_path / "first")
    time.sleep(2.5)
    with pytest.raises(TransferError, match="refused to read it"):
        worker.download(ref, tmp_path / "second")


def test_revoked_or_borrowed_tokens_cannot_log_in(
    tmp_path: Path, server: SftpServer, tokens: TokenStore, store: LocalStore
) -> None:
    token, record = tokens.issue("gpu-box", "gpu", 3600)
    tokens.revoke(record.id)
    with pytest.raises(PipelineError, match="refused"):
        transport(tmp_path, server, token).session()
    other, _ = tokens.issue("cpu-box", "cpu", 3600)
    client = paramiko.Transport(("127.0.0.1", server.port))
    try:
        client.start_client(timeout=10)
        with pytest.raises(paramiko.AuthenticationException):
            client.auth_password("gpu-box", other)  # cpu-box's token, gpu-box's name
    finally:
        client.close()
