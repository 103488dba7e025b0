"""``MORAG_SFTP_HOST`` naming several servers (replicas serving one store): a worker moves on from
one that does not answer, and never from one that refuses its login or shows another host key."""

from __future__ import annotations

from pathlib import Path

import paramiko
import pytest

from pipeline.errors import TransferError
from pipeline.transfer.checksums import sha256_file
from pipeline.transfer.local import LocalStore
from pipeline.transfer.sftp_client import HostKeyRefused, SftpTransport, connect
from pipeline.transfer.sftp_server import SftpServer, WorkerCredentials, load_host_key
from tests.conftest import free_port
from tests.transfer.conftest import PASSWORD, USER, put_input, worker_settings


def test_a_server_that_does_not_answer_makes_way_for_the_next(
    server: SftpServer, store: LocalStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref = put_input(store, "f1", "in.bin", b"served by the second replica")
    down = free_port()
    settings = worker_settings(
        tmp_path, 22, sftp_host=f"127.0.0.1:{down},127.0.0.1:{server.port}", sftp_host_key=server.fingerprint
    )
    transport = SftpTransport(settings)
    try:
        got = transport.download(ref, tmp_path / "got.bin")
    finally:
        transport.close()
    assert got.read_bytes() == b"served by the second replica"
    assert sha256_file(got) == ref.sha256
    [skipped] = [
        r for r in caplog.records if r.getMessage() == "sftp server not answering; trying the next one"
    ]
    assert skipped.server == f"127.0.0.1:{down}"  # type: ignore[attr-defined]
    assert skipped.next == f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]


def test_every_server_down_raises_the_last_ones_error(tmp_path: Path) -> None:
    ports = free_port(), free_port()
    settings = worker_settings(tmp_path, 22, sftp_host=",".join(f"127.0.0.1:{p}" for p in ports),
                               sftp_host_key="SHA256:x")  # fmt: skip
    with pytest.raises(ConnectionRefusedError):
        connect(settings)


def test_a_refused_host_key_is_not_passed_over(server: SftpServer, store: LocalStore, tmp_path: Path) -> None:
    """A replica showing another host key is a fault to fix, not an outage to route around."""
    other = load_host_key(tmp_path / "other_key")
    with SftpServer(store.root, other, WorkerCredentials(USER, PASSWORD), "127.0.0.1", 0) as impostor:
        hosts = f"127.0.0.1:{impostor.port},127.0.0.1:{server.port}"
        settings = worker_settings(tmp_path, 22, sftp_host=hosts, sftp_host_key=server.fingerprint)
        with pytest.raises(HostKeyRefused, match=f"127.0.0.1:{impostor.port} presented host key"):
            connect(settings)


def test_a_refused_login_is_not_passed_over(
    server: SftpServer, store: LocalStore, host_key: paramiko.PKey, tmp_path: Path
) -> None:
    with SftpServer(
        store.root, host_key, WorkerCredentials(USER, "another password"), "127.0.0.1", 0
    ) as strict:
        hosts = f"127.0.0.1:{strict.port},127.0.0.1:{server.port}"
        settings = worker_settings(tmp_path, 22, sftp_host=hosts, sftp_host_key=server.fingerprint)
        with pytest.raises(TransferError, match=f"SFTP server 127.0.0.1:{strict.port} refused worker"):
            connect(settings)
