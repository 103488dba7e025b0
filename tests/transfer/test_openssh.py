"""Interop with OpenSSH: our client against sshd's sftp-server, OpenSSH's sftp against our server."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from pipeline.config import Settings
from pipeline.security.grants import issue_grant
from pipeline.transfer.local import LocalStore
from pipeline.transfer.sftp_client import HostKeyRefused, SftpTransport, connect
from pipeline.transfer.sftp_server import SftpServer, WorkerCredentials, read_authorized_keys
from tests.transfer.conftest import USER, known_hosts_line, put_input, worker_settings
from tests.transfer.openssh import OpenSsh
from tests.transfer.proxy import DOWN, CuttingProxy

pytestmark = pytest.mark.openssh


def openssh_settings(
    tmp_path: Path, openssh: OpenSsh, store: LocalStore, port: int | None = None
) -> Settings:
    """A worker configured for a store served by OpenSSH: key login, the store's absolute path as root."""
    return worker_settings(
        tmp_path,
        port or openssh.port,
        sftp_username=openssh.user,
        sftp_password=None,
        sftp_key_file=openssh.client_key,
        sftp_host_key=openssh.host_key_line,
        sftp_root=str(store.root),
    )


def test_our_client_against_openssh(
    openssh: OpenSsh, store: LocalStore, payload: bytes, tmp_path: Path
) -> None:
    ref = put_input(store, "o1", "in.bin", payload)
    transport = SftpTransport(openssh_settings(tmp_path, openssh, store))
    try:
        # Task messages carry a transfer grant; sshd has no grants (the chroot confines) and is sent none.
        transport.authorize("o1", issue_grant(b"s" * 48, "o1", [ref.path], 600))
        local = transport.download(ref, tmp_path / "in.bin")
        assert local.read_bytes() == payload
        # OpenSSH has no hashing extension: the upload is read back and hashed before the rename.
        uploaded = transport.upload(local, "tasks/o1/output/out.bin")
        assert transport.read_small("tasks/o1/output/missing.json") is None
        transport.forget("o1")
    finally:
        transport.close()
    store.check(uploaded)
    assert [p.name for p in store.resolve("tasks/o1/output").iterdir()] == ["out.bin"]


def test_our_client_resumes_against_openssh(
    openssh: OpenSsh, store: LocalStore, payload: bytes, tmp_path: Path
) -> None:
    ref = put_input(store, "o2", "in.bin", payload)
    proxy = CuttingProxy(openssh.port, direction=DOWN, limit=len(payload) // 3, cuts=2)
    transport = SftpTransport(openssh_settings(tmp_path, openssh, store, port=proxy.port))
    try:
        assert transport.download(ref, tmp_path / "in.bin").read_bytes() == payload
        src = tmp_path / "up.bin"
        src.write_bytes(payload[::-1])
        uploaded = transport.upload(src, "tasks/o2/output/out.bin")
    finally:
        transport.close()
        proxy.close()
    assert proxy.cut_count == 2
    store.check(uploaded)


def test_openssh_changed_host_key_is_refused(openssh: OpenSsh, store: LocalStore, tmp_path: Path) -> None:
    other = paramiko.Ed25519Key.from_private_key_file(str(openssh.client_key))
    settings = openssh_settings(tmp_path, openssh, store).model_copy(
        update={"sftp_host_key": other.fingerprint}
    )
    with pytest.raises(HostKeyRefused):
        connect(settings)


@pytest.fixture
def key_server(store: LocalStore, host_key: paramiko.PKey, client_key: Path) -> Iterator[SftpServer]:
    """The embedded server accepting the client key (public key login)."""
    credentials = WorkerCredentials(USER, None, read_authorized_keys(Path(f"{client_key}.pub")))
    with SftpServer(store.root, host_key, credentials, "127.0.0.1", 0) as running:
        yield running


def openssh_sftp(
    server: SftpServer, client_key: Path, tmp_path: Path, commands: str
) -> subprocess.CompletedProcess:
    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_line(server.port, server.host_key))
    batch = tmp_path / "batch"
    batch.write_text(commands)
    return subprocess.run(
        ["sftp", "-F", "/dev/null", "-b", str(batch), "-P", str(server.port), "-i", str(client_key),
         "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", f"{USER}@127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_openssh_sftp_against_our_server(
    key_server: SftpServer, store: LocalStore, client_key: Path, payload: bytes, tmp_path: Path
) -> None:
    put_input(store, "o3", "in.bin", payload)
    (tmp_path / "local.txt").write_text("from openssh")
    result = openssh_sftp(
        key_server, client_key, tmp_path,
        f"ls -l /tasks/o3/input\n"
        f"get /tasks/o3/input/in.bin {tmp_path / 'got.bin'}\n"
        f"mkdir /tasks/o3/output\n"
        f"put {tmp_path / 'local.txt'} /tasks/o3/output/.up.partial\n"
        f"rename /tasks/o3/output/.up.partial /tasks/o3/output/up.txt\n"
        "cd ../../..\n"
        "pwd\n"
        "ls /\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "in.bin" in result.stdout and "Remote working directory: /" in result.stdout
    assert (tmp_path / "got.bin").read_bytes() == payload
    assert store.resolve("tasks/o3/output/up.txt").read_text() == "from openssh"


def test_openssh_sftp_cannot_leave_the_store(
    key_server: SftpServer, store: LocalStore, client_key: Path, tmp_path: Path
) -> None:
    secret = store.root.parent / "secret.txt"
    secret.write_text("outside")
    result = openssh_sftp(key_server, client_key, tmp_path, f"get ../secret.txt {tmp_path / 'stolen'}\n")
    assert result.returncode != 0
    assert not (tmp_path / "stolen").exists()


def test_openssh_sftp_with_an_unknown_key_is_refused_by_our_server(
    server: SftpServer, tmp_path: Path, client_key: Path
) -> None:
    """The password-only server refuses OpenSSH's key login: no credential, no session."""
    result = openssh_sftp(server, client_key, tmp_path, "ls /\n")
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
