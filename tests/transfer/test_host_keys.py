"""Host keys are pinned: an unknown or changed key is refused, never learned."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import paramiko
import pytest

from pipeline.transfer.local import LocalStore
from pipeline.transfer.sftp_client import HostKeyRefused, SftpTransport, connect
from pipeline.transfer.sftp_server import SftpServer, SftpServerError, load_host_key, public_key_line
from tests.transfer.conftest import known_hosts_line, put_input, worker_settings


@pytest.fixture
def other_key(tmp_path: Path) -> paramiko.PKey:
    return load_host_key(tmp_path / "other_key")


def test_host_key_is_made_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "data" / "sftp_host_ed25519_key"
    key = load_host_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_host_key(path).fingerprint == key.fingerprint
    assert key.fingerprint.startswith("SHA256:") and key.get_name() == "ssh-ed25519"


def test_host_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    load_host_key(path)
    path.chmod(0o644)
    with pytest.raises(SftpServerError, match="chmod 600"):
        load_host_key(path)


def test_pinned_fingerprint_or_key_line_connects(
    server: SftpServer, store: LocalStore, tmp_path: Path
) -> None:
    put_input(store, "h0", "in.bin", b"pinned")
    for pin in (
        server.fingerprint,
        public_key_line(server.host_key),
        public_key_line(server.host_key) + " c",  # a key line with a comment
    ):
        session = connect(worker_settings(tmp_path, server.port, sftp_host_key=pin))
        try:
            assert session.transport.get_remote_server_key() == server.host_key
            assert session.sftp.stat("/tasks/h0/input/in.bin").st_size == len(b"pinned")
        finally:
            session.close()


def test_no_pin_is_refused(server: SftpServer, tmp_path: Path) -> None:
    with pytest.raises(HostKeyRefused, match="no host key pinned.*MORAG_SFTP_HOST_KEY"):
        connect(worker_settings(tmp_path, server.port))


@pytest.mark.parametrize("form", ["fingerprint", "key line"])
def test_changed_key_is_refused(
    server: SftpServer, tmp_path: Path, other_key: paramiko.PKey, form: str
) -> None:
    pin = other_key.fingerprint if form == "fingerprint" else public_key_line(other_key)
    with pytest.raises(
        HostKeyRefused, match=re.escape(f"presented host key {server.fingerprint}, not the pinned")
    ):
        connect(worker_settings(tmp_path, server.port, sftp_host_key=pin))


def test_known_hosts(server: SftpServer, tmp_path: Path, other_key: paramiko.PKey) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_line(server.port, server.host_key))
    connect(worker_settings(tmp_path, server.port, sftp_known_hosts=known)).close()

    known.write_text(known_hosts_line(server.port, other_key))
    with pytest.raises(HostKeyRefused, match=r"does not match .* \(the key changed\)"):
        connect(worker_settings(tmp_path, server.port, sftp_known_hosts=known))

    known.write_text(known_hosts_line(server.port + 1, server.host_key))
    with pytest.raises(HostKeyRefused, match="is not in .* unknown host"):
        connect(worker_settings(tmp_path, server.port, sftp_known_hosts=known))


def test_transfer_with_a_changed_key_fails_at_once(
    server: SftpServer, store: LocalStore, tmp_path: Path, other_key: paramiko.PKey
) -> None:
    """No retries, nothing written: a changed key is not a transient error."""
    ref = put_input(store, "h1", "in.bin", b"data")
    waits: list[float] = []
    transport = SftpTransport(
        worker_settings(tmp_path, server.port, sftp_host_key=other_key.fingerprint), sleep=waits.append
    )
    with pytest.raises(HostKeyRefused):
        transport.download(ref, tmp_path / "in.bin")
    with pytest.raises(HostKeyRefused):
        transport.upload(store.resolve(ref.path), "tasks/h1/output/out.bin")
    assert waits == []
    assert not (tmp_path / "in.bin").exists()
    assert not store.resolve("tasks/h1").joinpath("output").exists()
