"""OpenSSH's sshd on a free high port with a throwaway config, for interop tests and the benchmark."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")


@dataclass
class OpenSsh:
    """A running sshd and the keys to talk to it."""

    port: int
    user: str
    host_key_line: str
    client_key: Path
    folder: Path


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def ssh_keygen(path: Path) -> None:
    """An Ed25519 key pair without passphrase, in OpenSSH format."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@contextmanager
def sshd(folder: Path, client_key: Path) -> Iterator[OpenSsh]:
    """Run sshd (key logins for this user only, OpenSSH's sftp-server) until the block ends.

    ``client_key`` is the private key whose ``.pub`` may log in.
    """
    if not SSHD.exists() or not SFTP_SERVER.exists():
        raise RuntimeError("OpenSSH server not installed: apt-get install openssh-server")
    folder.mkdir(parents=True, exist_ok=True)
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
    with open(folder / "sshd.log", "wb") as log:
        process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")], stdout=subprocess.DEVNULL, stderr=log
        )
    try:
        wait_for_port(port)
        line = " ".join((folder / "host_key.pub").read_text().split()[:2])
        yield OpenSsh(port, getpass.getuser(), line, client_key, folder)
    finally:
        process.terminate()
        process.wait(timeout=10)
