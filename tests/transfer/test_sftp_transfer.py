"""Downloads and uploads through the embedded SFTP server, verified by SHA-256."""

from __future__ import annotations

import threading
from pathlib import Path

import paramiko
import pytest

from pipeline.config import Settings
from pipeline.errors import BadInput, TransferError
from pipeline.transfer.checksums import FileRef, sha256_file
from pipeline.transfer.local import LocalStore
from pipeline.transfer.sftp_client import SftpTransport
from pipeline.transfer.sftp_server import SftpServer, WorkerCredentials, read_authorized_keys
from pipeline.transfer.transport import open_transport
from tests.transfer.conftest import put_input, worker_settings
from tests.transfer.openssh import ssh_keygen


def test_download_and_upload_round_trip(
    settings: Settings, store: LocalStore, payload: bytes, tmp_path: Path
) -> None:
    ref = put_input(store, "t1", "talk.bin", payload)
    transport = open_transport(settings)
    assert isinstance(transport, SftpTransport)
    try:
        local = transport.download(ref, tmp_path / "in.bin")
        assert local.read_bytes() == payload
        assert not (tmp_path / "in.bin.partial").exists()

        uploaded = transport.upload(local, LocalStore.output_path("t1", "talk.json"))
    finally:
        transport.close()
    assert uploaded == FileRef("tasks/t1/output/talk.json", ref.sha256, ref.size)
    store.check(uploaded)
    # Only the renamed output is left: no temporary name.
    assert [p.name for p in store.resolve("tasks/t1/output").iterdir()] == ["talk.json"]


def test_empty_file_and_replacing_an_output(settings: Settings, store: LocalStore, tmp_path: Path) -> None:
    ref = put_input(store, "t2", "empty.txt", b"")
    transport = SftpTransport(settings)
    try:
        assert transport.download(ref, tmp_path / "empty").read_bytes() == b""
        first, second = tmp_path / "a.txt", tmp_path / "b.txt"
        first.write_text("first")
        second.write_text("second, longer")
        transport.upload(first, "tasks/t2/output/out.txt")
        ref2 = transport.upload(second, "tasks/t2/output/out.txt")
    finally:
        transport.close()
    assert store.resolve(ref2.path).read_text() == "second, longer"
    store.check(ref2)


def test_missing_input_is_bad_input(settings: Settings, tmp_path: Path) -> None:
    transport = SftpTransport(settings)
    try:
        with pytest.raises(BadInput, match="not in the store"):
            transport.download(FileRef("tasks/nope/input/x.bin", "0" * 64, 1), tmp_path / "x")
    finally:
        transport.close()
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_store_paths_are_checked_on_the_client(settings: Settings, tmp_path: Path) -> None:
    transport = SftpTransport(settings)
    src = tmp_path / "f"
    src.write_text("x")
    for bad in ("../x", "/etc/passwd", "tasks/../../x", ""):
        with pytest.raises(BadInput):
            transport.upload(src, bad)


def test_read_small(settings: Settings, store: LocalStore) -> None:
    put_input(store, "t3", "note.txt", b"hello manifest")
    transport = SftpTransport(settings)
    try:
        assert transport.read_small("tasks/t3/input/note.txt") == b"hello manifest"
        assert transport.read_small("tasks/t3/input/note.txt", limit=5) == b"hello"
        assert transport.read_small("tasks/t3/output/.manifest.json") is None
    finally:
        transport.close()


def test_several_workers_at_once(server: SftpServer, store: LocalStore, tmp_path: Path) -> None:
    """Eight worker threads, each with its own connection, move files at the same time."""
    refs = [put_input(store, f"c{i}", "in.bin", bytes([i]) * (300_000 + i)) for i in range(8)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        folder = tmp_path / f"w{i}"
        folder.mkdir()
        transport = SftpTransport(worker_settings(folder, server.port, sftp_host_key=server.fingerprint))
        try:
            local = transport.download(refs[i], folder / "in.bin")
            transport.upload(local, f"tasks/c{i}/output/out.bin")
        except BaseException as exc:
            errors.append(exc)
        finally:
            transport.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for i, ref in enumerate(refs):
        assert sha256_file(store.resolve(f"tasks/c{i}/output/out.bin")) == ref.sha256


def test_wrong_password_is_refused(server: SftpServer, tmp_path: Path, store: LocalStore) -> None:
    ref = put_input(store, "t4", "in.bin", b"data")
    bad = worker_settings(tmp_path, server.port, sftp_host_key=server.fingerprint, sftp_password="wrong")
    transport = SftpTransport(bad)
    with pytest.raises(TransferError, match="refused worker 'worker'"):
        transport.download(ref, tmp_path / "in.bin")


def test_unreachable_server_fails_after_the_configured_attempts(tmp_path: Path, store: LocalStore) -> None:
    from tests.transfer.openssh import free_port

    settings = worker_settings(tmp_path, free_port(), sftp_host_key="SHA256:unused", sftp_attempts=3)
    waits: list[float] = []
    transport = SftpTransport(settings, sleep=waits.append)
    with pytest.raises(TransferError, match="after 3 attempts"):
        transport.download(FileRef("tasks/t/input/x", "0" * 64, 1), tmp_path / "x")
    assert len(waits) == 2 and waits[0] <= waits[1] * 2


def test_public_key_login(
    store: LocalStore, host_key: paramiko.PKey, client_key: Path, tmp_path: Path
) -> None:
    """A worker logs in with its key when the server lists it; any other key is refused."""
    ref = put_input(store, "k1", "in.bin", b"key login")
    credentials = WorkerCredentials("worker", None, read_authorized_keys(Path(f"{client_key}.pub")))
    with SftpServer(store.root, host_key, credentials, "127.0.0.1", 0) as server:
        pin = {"sftp_host_key": server.fingerprint}
        settings = worker_settings(tmp_path, server.port, **pin, sftp_password=None, sftp_key_file=client_key)
        transport = SftpTransport(settings)
        try:
            assert transport.download(ref, tmp_path / "in.bin").read_bytes() == b"key login"
        finally:
            transport.close()
        stranger = tmp_path / "stranger"
        ssh_keygen(stranger)
        for wrong in (
            {"sftp_password": None, "sftp_key_file": stranger},
            {"sftp_password": "no passwords here"},
        ):
            with pytest.raises(TransferError, match="refused worker"):
                SftpTransport(worker_settings(tmp_path, server.port, **pin, **wrong)).download(
                    ref, tmp_path / "x"
                )


def test_a_task_s_outputs_ask_about_their_folder_once_and_verify_in_one_round_trip(
    settings: Settings, store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six outputs into one folder: the folder is looked for (and made) at the first only, and each
    file's size comes with its hash (FSTAT beside check-file) instead of a stat of its own; a folder
    removed meanwhile is made again and the upload still lands, verified."""
    sent: list[int] = []
    request = paramiko.SFTPClient._async_request

    def counted(self: paramiko.SFTPClient, fileobj: object, t: int, *args: object) -> int:
        sent.append(t)
        return request(self, fileobj, t, *args)

    monkeypatch.setattr(paramiko.SFTPClient, "_async_request", counted)
    transport = SftpTransport(settings)
    try:
        refs, firsts = [], 0
        for fmt in ("json", "srt", "vtt", "txt", "md", "morag.md"):
            local = tmp_path / f"talk.{fmt}"
            local.write_text(f"the {fmt} output\n")
            refs.append(transport.upload(local, f"tasks/t9/output/talk.{fmt}"))
            firsts = firsts or len(sent)
        assert paramiko.sftp.CMD_STAT in sent[:firsts]  # the first looked for the folder
        assert paramiko.sftp.CMD_STAT not in sent[firsts:]  # the next five did not, nor stat their file
        assert sent.count(paramiko.sftp.CMD_FSTAT) == 6
        # open, write, fstat + check-file (sent together: one round trip), close, rename
        assert len(sent[firsts:]) == 5 * 6
        for ref in refs:
            store.check(ref)

        for path in store.resolve("tasks/t9/output").iterdir():
            path.unlink()
        store.resolve("tasks/t9/output").rmdir()
        again = transport.upload(tmp_path / "talk.json", "tasks/t9/output/talk.json")
    finally:
        transport.close()
    store.check(again)
    assert [p.name for p in store.resolve("tasks/t9/output").iterdir()] == ["talk.json"]
