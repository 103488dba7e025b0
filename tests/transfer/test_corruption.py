"""A byte flipped on the server's side: detected, fetched again, never used."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.errors import ChecksumMismatch
from pipeline.transfer.local import LocalStore
from pipeline.transfer.sftp_client import SftpTransport
from tests.transfer.conftest import put_input

MISMATCH = "sftp download does not match its checksum, fetching again"


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_is_fetched_again(
    settings: Settings, store: LocalStore, payload: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first copy mismatches; the server's file is repaired before the next attempt, which succeeds."""
    ref = put_input(store, "f1", "in.bin", payload)
    stored = store.resolve(ref.path)
    flip(stored, len(payload) // 2)
    dest = tmp_path / "in.bin"
    seen_before_retry: list[bool] = []

    def repair_then_wait(seconds: float) -> None:
        seen_before_retry.append(dest.exists())
        stored.write_bytes(payload)

    transport = SftpTransport(settings, sleep=repair_then_wait)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            local = transport.download(ref, dest)
    finally:
        transport.close()
    assert local.read_bytes() == payload
    assert seen_before_retry == [False]  # the bad copy never reached the destination
    assert [r.getMessage() for r in caplog.records].count(MISMATCH) == 1


def test_corrupt_file_fails_after_the_configured_attempts(
    settings: Settings, store: LocalStore, payload: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref = put_input(store, "f2", "in.bin", payload)
    flip(store.resolve(ref.path), 12345)
    transport = SftpTransport(settings)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline"), pytest.raises(ChecksumMismatch) as failure:
            transport.download(ref, tmp_path / "in.bin")
    finally:
        transport.close()
    message = str(failure.value)
    assert "tasks/f2/input/in.bin" in message and f"after {settings.sftp_attempts} attempts" in message
    assert [r.getMessage() for r in caplog.records].count(MISMATCH) == settings.sftp_attempts
    assert list(tmp_path.glob("in.bin*")) == []  # nothing left to be used by mistake


def test_size_change_on_the_server_is_a_mismatch(
    settings: Settings, store: LocalStore, payload: bytes, tmp_path: Path
) -> None:
    ref = put_input(store, "f3", "in.bin", payload)
    store.resolve(ref.path).write_bytes(payload[:-1])
    transport = SftpTransport(settings)
    try:
        with pytest.raises(ChecksumMismatch, match=f"the server's copy has {len(payload) - 1} bytes"):
            transport.download(ref, tmp_path / "in.bin")
    finally:
        transport.close()
    assert list(tmp_path.glob("in.bin*")) == []
