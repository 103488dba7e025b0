"""Fixtures for transfer tests: a store, the embedded SFTP server on a free port, worker
settings pinned to its host key, OpenSSH's sshd on a high port with a throwaway config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from pipeline.config import FileAccess, Settings
from pipeline.security.tokens import TokenStore
from pipeline.store import TaskStore
from pipeline.transfer.checksums import FileRef, sha256_file
from pipeline.transfer.local import LocalStore
from pipeline.transfer.serving import FileServices, start_file_services
from pipeline.transfer.sftp_server import SftpServer, WorkerCredentials, load_host_key, public_key_line
from tests.transfer.openssh import OpenSsh, ssh_keygen, sshd

USER = "worker"
PASSWORD = "test-password-not-secret"


@pytest.fixture(scope="session")
def host_key(tmp_path_factory: pytest.TempPathFactory) -> paramiko.PKey:
    return load_host_key(tmp_path_factory.mktemp("hostkey") / "sftp_host_ed25519_key")


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "server" / "files")


@pytest.fixture
def server(store: LocalStore, host_key: paramiko.PKey) -> Iterator[SftpServer]:
    with SftpServer(store.root, host_key, WorkerCredentials(USER, PASSWORD), "127.0.0.1", 0) as running:
        yield running


def worker_settings(tmp_path: Path, port: int, **overrides: Any) -> Settings:
    """A worker's settings: its own empty data directory, files over SFTP, fast retries."""
    data_dir = tmp_path / "worker"
    data_dir.mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "file_access": FileAccess.sftp,
        "sftp_host": "127.0.0.1",
        "sftp_port": port,
        "sftp_username": USER,
        "sftp_password": PASSWORD,
        "sftp_attempts": 4,
        "sftp_backoff_s": 0.01,
        "sftp_max_backoff_s": 0.05,
        "sftp_timeout_s": 10,
        "worker_name": "test-worker",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, server: SftpServer) -> Settings:
    return worker_settings(tmp_path, server.port, sftp_host_key=server.fingerprint)


def put_input(store: LocalStore, task_id: str, name: str, content: bytes) -> FileRef:
    """A file in the store as the API would put it there, and its reference."""
    path = store.resolve(LocalStore.input_path(task_id, name))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return FileRef(LocalStore.input_path(task_id, name), sha256_file(path), len(content))


@pytest.fixture(scope="session")
def payload() -> bytes:
    """3 MB of incompressible bytes: a dozen requests of the client's block size."""
    return os.urandom(3 * 1024 * 1024 + 12345)


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Ed25519 key pair in OpenSSH format, as a worker (or OpenSSH's sftp) logs in with."""
    path = tmp_path_factory.mktemp("clientkey") / "id_ed25519"
    ssh_keygen(path)
    return path


@pytest.fixture
def openssh(tmp_path: Path, client_key: Path) -> Iterator[OpenSsh]:
    """OpenSSH's sshd on a free high port, with a throwaway config: key logins only, sftp-server."""
    with sshd(tmp_path / "sshd", client_key) as running:
        yield running


def known_hosts_line(port: int, key: paramiko.PKey) -> str:
    return f"[127.0.0.1]:{port} {public_key_line(key)}\n"


#: The server secret of the tests that run the file services over a task store.
SERVER_SECRET = b"S" * 48


@pytest.fixture
def tasks(server_settings: Settings) -> TaskStore:
    """The task store of ``server_settings`` (a module of tests defines that fixture)."""
    return TaskStore(server_settings.db_path)


@pytest.fixture
def files(server_settings: Settings) -> LocalStore:
    return LocalStore(server_settings.files_dir)


@pytest.fixture
def tokens(server_settings: Settings) -> TokenStore:
    return TokenStore(server_settings.db_path, SERVER_SECRET)


@pytest.fixture
def served(
    server_settings: Settings, tasks: TaskStore, files: LocalStore, tokens: TokenStore
) -> Iterator[FileServices]:
    """What ``morag-pipeline server`` starts for files: the embedded SFTP server reading the task store."""
    running = start_file_services(server_settings, tasks, files, tokens)
    assert running.sftp is not None
    yield running
    running.stop()
