"""A connection cut mid-transfer, in either direction: the transfer resumes and the checksum matches."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import TransferError
from pipeline.transfer.checksums import sha256_file
from pipeline.transfer.local import LocalStore
from pipeline.transfer.sftp_client import BLOCK, DEPTH, SftpTransport, connect
from pipeline.transfer.sftp_server import SftpServer
from tests.transfer.conftest import put_input, worker_settings
from tests.transfer.proxy import DOWN, UP, CuttingProxy


@pytest.fixture
def through(server: SftpServer) -> Iterator[list[CuttingProxy]]:
    """Proxies made by the test, closed afterwards."""
    made: list[CuttingProxy] = []
    yield made
    for proxy in made:
        proxy.close()


def _transfer(op: str, transport: SftpTransport, store: LocalStore, tmp_path: Path, payload: bytes) -> None:
    if op == "download":
        ref = store.resolve("tasks/r1/input/in.bin")
        from pipeline.transfer.checksums import FileRef

        local = transport.download(
            FileRef("tasks/r1/input/in.bin", sha256_file(ref), len(payload)), tmp_path / "dl"
        )
        assert local.read_bytes() == payload
    else:
        src = tmp_path / "up.bin"
        src.write_bytes(payload)
        uploaded = transport.upload(src, "tasks/r1/output/out.bin")
        store.check(uploaded)
        assert store.resolve(uploaded.path).read_bytes() == payload


@pytest.mark.parametrize("direction", [DOWN, UP])
@pytest.mark.parametrize("op", ["download", "upload"])
def test_cut_connection_resumes(
    op: str,
    direction: str,
    server: SftpServer,
    store: LocalStore,
    payload: bytes,
    tmp_path: Path,
    through: list[CuttingProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.transfer.sftp_client")
    put_input(store, "r1", "in.bin", payload)
    (tmp_path / "ok").mkdir()

    # What a session costs before any file moves, and what the whole transfer
    # moves each way, through a proxy that cuts nothing.
    counting = CuttingProxy(server.port)
    through.append(counting)
    settings = worker_settings(tmp_path, counting.port, sftp_host_key=server.fingerprint)
    connect(settings).close()
    handshake = dict(counting.moved)
    clean = SftpTransport(settings)
    _transfer(op, clean, store, tmp_path / "ok", payload)
    clean.close()
    whole = {way: counting.moved[way] - 2 * handshake[way] for way in (UP, DOWN)}

    # Now cut the first two connections a third of the way through the
    # transfer's bytes in `direction`: each resumed connection gets further.
    limit = handshake[direction] + whole[direction] // 3
    cutting = CuttingProxy(server.port, direction=direction, limit=limit, cuts=2)
    through.append(cutting)
    transport = SftpTransport(worker_settings(tmp_path, cutting.port, sftp_host_key=server.fingerprint))
    try:
        _transfer(op, transport, store, tmp_path, payload)
    finally:
        transport.close()
    assert cutting.cut_count == 2 and cutting.connections == 3
    busy = DOWN if op == "download" else UP
    if busy == direction:
        # Resumed, not restarted: restarting would move the payload at least twice.
        assert cutting.moved[busy] < 1.4 * len(payload) + 3 * handshake[busy]
    else:
        # The replies were cut: what was in flight when a reply went missing is sent again (at most
        # DEPTH requests of BLOCK bytes per cut, as many as the load let through), never the whole.
        in_flight = DEPTH * BLOCK
        assert cutting.moved[busy] < len(payload) + 2 * in_flight + 3 * handshake[busy]
        if (
            op == "upload"
        ):  # the cut comes once data moved: each new attempt starts where the server's file ends
            offsets = [
                getattr(r, "offset", 0) for r in caplog.records if r.getMessage() == "sftp upload resumed"
            ]
            assert offsets and all(o > 0 for o in offsets), caplog.text
    assert not (tmp_path / "dl.partial").exists()


def test_connection_cut_every_time_fails_clearly(
    server: SftpServer, store: LocalStore, payload: bytes, tmp_path: Path, through: list[CuttingProxy]
) -> None:
    """A link that never gets past the handshake: a TransferError after the configured attempts."""
    put_input(store, "r1", "in.bin", payload)
    cutting = CuttingProxy(server.port, direction=DOWN, limit=500, cuts=100)
    through.append(cutting)
    settings = worker_settings(tmp_path, cutting.port, sftp_host_key=server.fingerprint, sftp_attempts=3)
    transport = SftpTransport(settings)
    with pytest.raises(TransferError, match="after 3 attempts"):
        _transfer("download", transport, store, tmp_path, payload)
    assert cutting.connections == 3
    assert not (tmp_path / "dl").exists() and not (tmp_path / "dl.partial").exists()
