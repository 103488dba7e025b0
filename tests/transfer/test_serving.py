"""What ``morag-pipeline server`` starts for files: the embedded SFTP server and the retention sweep."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.errors import TransferError
from pipeline.security.tokens import TokenStore
from pipeline.store import TaskStore
from pipeline.transfer.local import LocalStore
from pipeline.transfer.serving import start_file_services
from pipeline.transfer.sftp_client import SftpTransport
from pipeline.transfer.sftp_server import host_key_path, load_host_key
from tests.transfer.conftest import PASSWORD, USER, put_input, worker_settings
from tests.transfer.openssh import free_port


def test_server_starts_sftp_and_logs_its_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server_settings = Settings(
        data_dir=tmp_path / "server",
        sftp_port=free_port(),
        sftp_username=USER,
        sftp_password=PASSWORD,
        sftp_shared_account=True,
    )
    tasks, files = TaskStore(server_settings.db_path), LocalStore(server_settings.files_dir)
    ref = put_input(files, "s1", "in.bin", b"served")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        running = start_file_services(server_settings, tasks, files)
    try:
        fingerprint = load_host_key(host_key_path(server_settings)).fingerprint
        started = next(r for r in caplog.records if r.getMessage() == "sftp server listening")
        assert started.fingerprint == fingerprint  # type: ignore[attr-defined]
        assert any("shared SFTP account is served" in r.getMessage() for r in caplog.records)
        assert running.retention is not None
        worker = worker_settings(tmp_path, server_settings.sftp_port, sftp_host_key=fingerprint)
        transport = SftpTransport(worker)
        try:
            assert transport.download(ref, tmp_path / "in.bin").read_bytes() == b"served"
        finally:
            transport.close()
    finally:
        running.stop()


def test_no_embedded_server_and_no_retention_when_configured_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, sftp_embedded=False, store_retention_hours=0)
    running = start_file_services(settings, TaskStore(settings.db_path), LocalStore(settings.files_dir))
    assert running.sftp is None and running.retention is None
    running.stop()


def test_shared_password_is_refused_unless_the_shared_account_is_turned_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A configured shared password alone serves nothing: MORAG_SFTP_SHARED_ACCOUNT must say so."""
    server_settings = Settings(
        data_dir=tmp_path / "server", sftp_port=free_port(), sftp_username=USER, sftp_password=PASSWORD
    )
    tasks, files = TaskStore(server_settings.db_path), LocalStore(server_settings.files_dir)
    ref = put_input(files, "s1", "in.bin", b"served")
    tokens = TokenStore(server_settings.db_path, b"S" * 48)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        running = start_file_services(server_settings, tasks, files, tokens)
    try:
        warning = next(r for r in caplog.records if "shared SFTP account is configured" in r.getMessage())
        assert "MORAG_SFTP_SHARED_ACCOUNT=true" in warning.getMessage()
        fingerprint = load_host_key(host_key_path(server_settings)).fingerprint
        worker = worker_settings(tmp_path, server_settings.sftp_port, sftp_host_key=fingerprint)
        with pytest.raises(TransferError, match=f"refused worker '{USER}'"):
            SftpTransport(worker).download(ref, tmp_path / "in.bin")
        assert not (tmp_path / "in.bin").exists()
    finally:
        running.stop()
