"""Fixtures for transfer tests: a store, the embedded SFTP server on a free port, worker
settings pinned to its host key, OpenSSH's sshd on a high port with a throwaway config."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest

from pipeline.config import FileAccess, Settings
from pipeline.transfer.checksums import FileRef, sha256_file
from pipeline.transfer.local import LocalStore
from pipeline.transfer.sftp_server import SftpServer, WorkerCredentials, load_host_key, public_key_line

USER = "worker"
PASSWORD = "test-password-not-secret"
SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@dataclass
class OpenSsh:
    """A running sshd and the keys to talk to it."""

    port: int
    user: str
    host_key_line: str
    client_key: Path
    client_public_key: Path
    folder: Path


def ssh_keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Ed25519 key pair in OpenSSH format, as a worker (or OpenSSH's sftp) logs in with."""
    path = tmp_path_factory.mktemp("clientkey") / "id_ed25519"
    ssh_keygen(path)
    return path


@pytest.fixture
def openssh(tmp_path: Path, client_key: Path) -> Iterator[OpenSsh]:
    """OpenSSH's sshd on a free high port, with a throwaway config: key logins only, sftp-server."""
    if not SSHD.exists() or not SFTP_SERVER.exists():
        pytest.fail("OpenSSH server not installed: apt-get install openssh-server")
    folder = tmp_path / "sshd"
    folder.mkdir()
    ssh_keygen(folder / "host_key")
    shutil.copy(f"{client_key}.pub", folder / "authorized_keys")
    if os.geteuid() == 0:
        # sshd started by root insists on its privilege separation folder.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {folder / 'host_key'}\n"
        f"PidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PermitRootLogin prohibit-password\n"
        f"Subsystem sftp {SFTP_SERVER}\n"
    )
    process = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "sshd.log", "wb"),  # noqa: SIM115
    )
    try:
        wait_for_port(port)
        line = " ".join((folder / "host_key.pub").read_text().split()[:2])
        yield OpenSsh(port, getpass.getuser(), line, client_key, Path(f"{client_key}.pub"), folder)
    finally:
        process.terminate()
        process.wait(timeout=10)


def known_hosts_line(port: int, key: paramiko.PKey) -> str:
    return f"[127.0.0.1]:{port} {public_key_line(key)}\n"
