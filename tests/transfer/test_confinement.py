"""Whatever path a client sends, nothing outside the store is read, written or listed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from pipeline.transfer.local import LocalStore
from pipeline.transfer.sftp_server import SftpServer
from tests.transfer.conftest import PASSWORD, USER

SECRET = b"outside the store"


@pytest.fixture
def sftp(server: SftpServer) -> Iterator[paramiko.SFTPClient]:
    """A plain paramiko SFTP client logged in to the embedded server."""
    transport = paramiko.Transport(("127.0.0.1", server.port))
    transport.connect(hostkey=server.host_key, username=USER, password=PASSWORD)
    client = paramiko.SFTPClient.from_transport(transport)
    assert client is not None
    yield client
    client.close()
    transport.close()


@pytest.fixture
def outside(store: LocalStore, tmp_path: Path) -> Path:
    """A secret file and folder beside the store, and symlinks in the store pointing at them."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_bytes(SECRET)
    task = store.resolve("tasks/t1")
    (task / "input").mkdir(parents=True)
    (task / "input" / "real.txt").write_bytes(b"inside")
    os.symlink(folder / "secret.txt", task / "input" / "file-link")
    os.symlink(folder, task / "dir-link")
    os.symlink(folder / "new.txt", task / "input" / "dangling-link")
    os.symlink(task / "input" / "real.txt", task / "input" / "inner-link")
    return folder


def test_root_is_the_store(sftp: paramiko.SFTPClient, outside: Path) -> None:
    assert sftp.listdir("/") == ["tasks"]
    for path in ("/..", "/../..", "..", "../../..", "tasks/../../..", "/tasks/t1/../../.."):
        assert sftp.listdir(path) == ["tasks"]
    assert sftp.normalize("../../..") == "/"


@pytest.mark.parametrize(
    "path",
    [
        "../outside/secret.txt",
        "/../outside/secret.txt",
        "tasks/../../outside/secret.txt",
        "tasks/t1/../../../outside/secret.txt",
        "{outside}/secret.txt",  # the absolute path on the server's disk
    ],
)
def test_traversal_finds_nothing(sftp: paramiko.SFTPClient, outside: Path, path: str) -> None:
    path = path.format(outside=outside)
    with pytest.raises(FileNotFoundError):
        sftp.open(path).read()
    with pytest.raises(OSError):
        sftp.open(path, "w").write(b"x")
    assert (outside / "secret.txt").read_bytes() == SECRET


def test_symlinks_out_of_the_store_are_refused(sftp: paramiko.SFTPClient, outside: Path) -> None:
    refused = PermissionError
    with pytest.raises(refused):
        sftp.open("tasks/t1/input/file-link").read()
    with pytest.raises(refused):
        sftp.stat("tasks/t1/input/file-link")
    with pytest.raises(refused):
        sftp.listdir("tasks/t1/dir-link")
    with pytest.raises(refused):
        sftp.open("tasks/t1/dir-link/secret.txt").read()
    with pytest.raises(refused):
        sftp.open("tasks/t1/dir-link/planted.txt", "w").write(b"x")
    with pytest.raises(refused):
        sftp.open("tasks/t1/input/dangling-link", "w").write(b"x")
    with pytest.raises(refused):
        sftp.mkdir("tasks/t1/dir-link/sub")
    with pytest.raises(refused):
        sftp.posix_rename("tasks/t1/input/real.txt", "tasks/t1/dir-link/moved.txt")
    with pytest.raises(refused):
        sftp.remove("tasks/t1/dir-link/secret.txt")
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_bytes() == SECRET
    # The link itself, not its target, is what lstat and listing show.
    assert sftp.lstat("tasks/t1/input/file-link").st_size == len(str(outside / "secret.txt"))


def test_clients_cannot_make_symlinks(sftp: paramiko.SFTPClient, outside: Path, store: LocalStore) -> None:
    with pytest.raises(OSError):
        sftp.symlink(str(outside / "secret.txt"), "tasks/t1/input/planted-link")
    with pytest.raises(OSError):
        sftp.readlink("tasks/t1/input/file-link")
    assert not os.path.lexists(store.resolve("tasks/t1/input") / "planted-link")


def test_links_inside_the_store_work(sftp: paramiko.SFTPClient, outside: Path) -> None:
    assert sftp.open("tasks/t1/input/inner-link").read() == b"inside"


def test_owner_changes_are_refused(sftp: paramiko.SFTPClient, outside: Path) -> None:
    with pytest.raises(PermissionError):
        sftp.chown("tasks/t1/input/real.txt", 0, 0)
    sftp.chmod("tasks/t1/input/real.txt", 0o4755)
    assert sftp.stat("tasks/t1/input/real.txt").st_mode & 0o7777 == 0o755  # no set-id bits


def test_the_root_cannot_be_removed(sftp: paramiko.SFTPClient, outside: Path) -> None:
    with pytest.raises(OSError):
        sftp.rmdir("/")
    with pytest.raises(OSError):
        sftp.rmdir("/..")
    assert sftp.listdir("/") == ["tasks"]


def test_server_hashes_what_it_holds(sftp: paramiko.SFTPClient, store: LocalStore, outside: Path) -> None:
    """check-file with sha256: from the writes as they arrived, or from the disk once the file changed."""
    import hashlib

    data = os.urandom(600_000)
    with sftp.open("tasks/t1/input/fresh.bin", "w") as f:
        f.set_pipelined(True)
        f.write(data)
        assert f.check("sha256") == hashlib.sha256(data).digest()
        # Changed on the server's disk behind the writer's back: the disk is hashed.
        local = store.resolve("tasks/t1/input/fresh.bin")
        changed = bytearray(local.read_bytes())
        changed[1000] ^= 1
        local.write_bytes(bytes(changed))
        os.utime(local, ns=(1, 1))
        assert f.check("sha256") == hashlib.sha256(changed).digest()
    with sftp.open("tasks/t1/input/fresh.bin") as f:
        assert f.check("sha256", 0, 1000) == hashlib.sha256(data[:1000]).digest()
        assert f.check("sha256") == hashlib.sha256(changed).digest()
