"""SFTP throughput on loopback: our client and server against OpenSSH, and what checksums cost.

One file (1 GiB by default) is downloaded and uploaded, in the same run, by:

- OpenSSH's ``sftp`` against OpenSSH's sshd (``sftp-server``): the baseline;
- our client (``SftpTransport``) against the same sshd;
- our client against our embedded server (run in its own process, as in production).

Our client is timed twice each way: as the product runs it (SHA-256 while
streaming; uploads verified by the server's ``check-file`` hash, or read back
where the server has none, as OpenSSH's) and with no hashing or verification
at all, the same bytes moved the same way. Every transfer opens its own
connection, handshake included. Rounds alternate between the contenders so
that load on the machine falls on all alike (each round in a rotated order);
medians of the rounds are printed, with ratios to the baseline and the cost
of checksums.

    .venv/bin/python -m bench.sftp_throughput --size-mb 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import FileAccess, Settings
from pipeline.transfer.checksums import FileRef
from pipeline.transfer.sftp_client import BLOCK, CREATE, READ, TRUNCATE, WRITE, SftpTransport, connect
from tests.transfer.openssh import OpenSsh, ssh_keygen, sshd

PASSWORD = "bench-password"
MB = 1000 * 1000


def make_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; returns their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * 1024 * 1024))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


@contextmanager
def embedded_server(
    root: Path, data_dir: Path, tuning: dict[str, int] | None = None
) -> Iterator[tuple[int, str]]:
    """Our SFTP server in a child process; yields (port, host key fingerprint)."""
    tune = [f"{name}={value}" for name, value in (tuning or {}).items()]
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.sftp_throughput", "--serve", str(root), str(data_dir), *tune],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port, fingerprint = child.stdout.readline().split()  # printed once it listens
        yield int(port), fingerprint
    finally:
        child.terminate()
        child.wait(timeout=10)


def serve(root: Path, data_dir: Path, tuning: dict[str, int] | None = None) -> None:
    """Run the embedded server until killed (the child process of ``embedded_server``).

    ``tuning`` overrides the server module's constants (``WINDOW_SIZE``, ``MAX_PACKET_SIZE``).
    """
    from pipeline.transfer import sftp_server
    from pipeline.transfer.sftp_server import SftpServer, WorkerCredentials, host_key_path, load_host_key

    for name, value in (tuning or {}).items():
        setattr(sftp_server, name, value)
    settings = Settings(data_dir=data_dir)
    server = SftpServer(
        root, load_host_key(host_key_path(settings)), WorkerCredentials("bench", PASSWORD), port=0
    )
    server.start()
    print(server.port, server.fingerprint, flush=True)
    while True:
        time.sleep(3600)


class Contender:
    """Our client against one server: the product's transfers, and the same without hashing."""

    def __init__(self, settings: Settings, sha256: str, size: int) -> None:
        self.settings = settings
        self.sha256 = sha256
        self.size = size

    def download(self, store_path: str, dest: Path) -> None:
        transport = SftpTransport(self.settings)
        try:
            transport.download(FileRef(store_path, self.sha256, self.size), dest)
        finally:
            transport.close()

    def upload(self, src: Path, store_path: str) -> None:
        transport = SftpTransport(self.settings)
        try:
            transport.upload(src, store_path)
        finally:
            transport.close()

    def download_unhashed(self, store_path: str, dest: Path) -> None:
        session = connect(self.settings)
        remote = posixpath.join(self.settings.sftp_root, store_path)
        try:
            with session.opened(remote, READ) as handle, dest.open("wb") as f:
                for data in session.read(handle, 0, self.size):
                    f.write(data)
        finally:
            session.close()

    def upload_unhashed(self, src: Path, store_path: str) -> None:
        session = connect(self.settings)
        remote = posixpath.join(self.settings.sftp_root, store_path)
        try:
            with (
                session.opened(remote + ".partial", WRITE | CREATE | TRUNCATE) as handle,
                src.open("rb") as f,
            ):
                session.write(handle, 0, iter(lambda: f.read(BLOCK), b""))
            session.sftp.posix_rename(remote + ".partial", remote)
        finally:
            session.close()


def openssh_sftp(openssh: OpenSsh, folder: Path, command: str) -> None:
    known = folder / "known_hosts"
    known.write_text(f"[127.0.0.1]:{openssh.port} {openssh.host_key_line}\n")
    batch = folder / "batch"
    batch.write_text(command + "\n")
    subprocess.run(
        ["sftp", "-q", "-F", "/dev/null", "-b", str(batch), "-P", str(openssh.port),
         "-i", str(openssh.client_key), "-o", f"UserKnownHostsFile={known}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         f"{openssh.user}@127.0.0.1"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def timed(run: Callable[[], None], cleanup: Callable[[], None]) -> float:
    """Seconds ``run`` takes; then ``cleanup``, and the disk is synced so the next run starts alike."""
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    cleanup()
    os.sync()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", nargs="+", metavar="ROOT DATA_DIR [NAME=VALUE...]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        tuning = {name: int(value) for name, _, value in (item.partition("=") for item in args.serve[2:])}
        serve(Path(args.serve[0]), Path(args.serve[1]), tuning)
        return

    size = args.size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="morag-bench-") as tmp:
        work = Path(tmp)
        store = work / "store"
        (store / "tasks" / "bench" / "input").mkdir(parents=True)
        (store / "tasks" / "bench" / "output").mkdir(parents=True)
        source = store / "tasks" / "bench" / "input" / "file.bin"
        print(f"writing a {args.size_mb} MiB test file...", file=sys.stderr)
        sha256 = make_file(source, size)
        local = work / "local.bin"
        os.link(source, local)
        ssh_keygen(work / "client_key")
        with (
            sshd(work / "sshd", work / "client_key") as openssh,
            embedded_server(store, work / "server") as ours,
        ):
            worker = {"data_dir": work / "worker", "file_access": FileAccess.sftp, "sftp_host": "127.0.0.1"}
            to_embedded = Contender(
                Settings(
                    **worker, sftp_port=ours[0], sftp_host_key=ours[1],
                    sftp_username="bench", sftp_password=PASSWORD,
                ),
                sha256, size,
            )  # fmt: skip
            to_openssh = Contender(
                Settings(
                    **worker, sftp_port=openssh.port, sftp_host_key=openssh.host_key_line,
                    sftp_username=openssh.user, sftp_key_file=openssh.client_key, sftp_root=str(store),
                ),
                sha256, size,
            )  # fmt: skip
            path, out_path = "tasks/bench/input/file.bin", "tasks/bench/output/up.bin"
            dest, uploaded = work / "download.bin", store / out_path

            def clean() -> None:
                dest.unlink(missing_ok=True)
                uploaded.unlink(missing_ok=True)

            cases: dict[str, Callable[[], None]] = {
                "openssh/openssh download": lambda: openssh_sftp(openssh, work, f"get {source} {dest}"),
                "openssh/openssh upload": lambda: openssh_sftp(openssh, work, f"put {local} {uploaded}"),
                "ours/openssh download": lambda: to_openssh.download(path, dest),
                "ours/openssh upload": lambda: to_openssh.upload(local, out_path),
                "ours/openssh download unhashed": lambda: to_openssh.download_unhashed(path, dest),
                "ours/openssh upload unhashed": lambda: to_openssh.upload_unhashed(local, out_path),
                "ours/embedded download": lambda: to_embedded.download(path, dest),
                "ours/embedded upload": lambda: to_embedded.upload(local, out_path),
                "ours/embedded download unhashed": lambda: to_embedded.download_unhashed(path, dest),
                "ours/embedded upload unhashed": lambda: to_embedded.upload_unhashed(local, out_path),
            }
            seconds: dict[str, list[float]] = {name: [] for name in cases}
            names = list(cases)
            for round_ in range(args.rounds):
                # Each round starts further down the list, so no contender always follows the same one.
                shift = round_ * 3 % len(names)
                for name in names[shift:] + names[:shift]:
                    seconds[name].append(timed(cases[name], clean))
                    print(
                        f"round {round_ + 1} {name}: {size / MB / seconds[name][-1]:.0f} MB/s",
                        file=sys.stderr,
                    )
    report(seconds, size, args)


def report(seconds: dict[str, list[float]], size: int, args: argparse.Namespace) -> None:
    rate = {name: size / MB / statistics.median(runs) for name, runs in seconds.items()}
    print(
        f"SFTP on loopback, {args.size_mb} MiB file, median of {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs; MB/s (10^6 bytes/s), connection setup included"
    )
    print(f"  {'client/server':<34}{'download':>10}{'upload':>10}   ratio to baseline (down / up)")
    baseline = rate["openssh/openssh download"], rate["openssh/openssh upload"]
    rows = [
        "openssh/openssh",
        "ours/openssh",
        "ours/openssh unhashed",
        "ours/embedded",
        "ours/embedded unhashed",
    ]
    for row in rows:
        pair, _, variant = row.partition(" ")
        down = rate[f"{pair} download {variant}".strip()]
        up = rate[f"{pair} upload {variant}".strip()]
        ratio = "(baseline)" if row == rows[0] else f"{down / baseline[0]:.2f} / {up / baseline[1]:.2f}"
        print(f"  {row:<34}{down:>10.0f}{up:>10.0f}   {ratio}")
    for server in ("embedded", "openssh"):
        costs = []
        for way in ("download", "upload"):
            hashed = statistics.median(seconds[f"ours/{server} {way}"])
            plain = statistics.median(seconds[f"ours/{server} {way} unhashed"])
            costs.append(f"{way} {100 * (hashed / plain - 1):+.1f}%")
        note = "" if server == "embedded" else " (uploads read back: OpenSSH cannot hash)"
        print(f"  checksum cost, ours/{server}: {', '.join(costs)} (time with checksums / without - 1){note}")


if __name__ == "__main__":
    main()
