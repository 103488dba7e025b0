"""What makes our SFTP transfers fast: each tuning undone in turn, against stock paramiko.

Downloads and uploads one file (256 MiB by default) on loopback, as the
product does them (SHA-256 while streaming, uploads verified by the server),
against our embedded server in its own process and against OpenSSH's sshd:

- ``tuned``: the settings the product ships;
- one row per tuning changed: 32 KiB requests; fewer or more requests in
  flight (64 with a 64 MiB window); paramiko's 2 MiB window; the client
  accepting 256 KiB SSH packets instead of 64 KiB; 32 KiB packets both ways;
  AES-CTR with HMAC instead of AES-GCM;
- ``stock paramiko``: ``SFTPClient.getfo``/``putfo`` on a default connection,
  no hashing at all (paramiko prefetches reads and pipelines writes by itself).

Rounds alternate between the configurations; medians are printed with the
ratio to ``tuned``.

    .venv/bin/python -m bench.sftp_tuning --size-mb 256 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import posixpath
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paramiko

from bench.sftp_throughput import PASSWORD, Contender, embedded_server, make_file
from pipeline.config import FileAccess, Settings
from pipeline.transfer import sftp_client
from tests.transfer.openssh import ssh_keygen, sshd

MB = 1000 * 1000
KIB = 1024

#: name: (client module overrides, server module overrides)
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    "tuned": ({}, {}),
    "32 KiB requests": ({"BLOCK": 32 * KIB}, {}),
    "4 requests in flight": ({"DEPTH": 4}, {}),
    "16 requests in flight": ({"DEPTH": 16}, {}),
    "64 requests in flight": (
        {"DEPTH": 64, "WINDOW_SIZE": 64 * 1024 * KIB},
        {"WINDOW_SIZE": 64 * 1024 * KIB},
    ),
    "2 MiB window": ({"WINDOW_SIZE": 2 * 1024 * KIB}, {"WINDOW_SIZE": 2 * 1024 * KIB}),
    "256 KiB packets received": ({"MAX_PACKET_SIZE": 256 * KIB}, {}),
    "32 KiB packets both ways": ({"MAX_PACKET_SIZE": 32 * KIB}, {"MAX_PACKET_SIZE": 32 * KIB}),
    "aes128-ctr + hmac": ({"CIPHERS": ("aes128-ctr",)}, {}),
}


def stock(settings: Settings, way: str, remote: str, local: Path) -> None:
    """paramiko used as its documentation shows: a default connection, getfo or putfo."""
    transport = paramiko.Transport((settings.sftp_host, settings.sftp_port))
    try:
        if settings.sftp_key_file is not None:
            transport.connect(
                username=settings.sftp_username, pkey=paramiko.PKey.from_path(settings.sftp_key_file)
            )
        else:
            assert settings.sftp_password is not None
            transport.connect(
                username=settings.sftp_username, password=settings.sftp_password.get_secret_value()
            )
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        if way == "download":
            with local.open("wb") as f:
                sftp.getfo(remote, f)
        else:
            with local.open("rb") as f:
                sftp.putfo(f, remote, confirm=False)
    finally:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024
    defaults = {
        name: getattr(sftp_client, name)
        for name in ("BLOCK", "DEPTH", "WINDOW_SIZE", "MAX_PACKET_SIZE", "CIPHERS")
    }
    with tempfile.TemporaryDirectory(prefix="morag-bench-") as tmp, ExitStack() as running:
        work = Path(tmp)
        store = work / "store"
        (store / "tasks" / "bench" / "input").mkdir(parents=True)
        (store / "tasks" / "bench" / "output").mkdir(parents=True)
        path, out_path = "tasks/bench/input/file.bin", "tasks/bench/output/up.bin"
        source = store / path
        print(f"writing a {args.size_mb} MiB test file...", file=sys.stderr)
        sha256 = make_file(source, size)
        local = work / "local.bin"
        os.link(source, local)
        dest, uploaded = work / "download.bin", store / out_path
        ssh_keygen(work / "client_key")
        openssh = running.enter_context(sshd(work / "sshd", work / "client_key"))
        worker = {"data_dir": work / "worker", "file_access": FileAccess.sftp, "sftp_host": "127.0.0.1"}
        servers: dict[str, Settings] = {
            "openssh": Settings(
                **worker, sftp_port=openssh.port, sftp_host_key=openssh.host_key_line,
                sftp_username=openssh.user, sftp_key_file=openssh.client_key, sftp_root=str(store),
            ),
        }  # fmt: skip
        for name, (_, server_tuning) in CONFIGS.items():
            port, fingerprint = running.enter_context(embedded_server(store, work / "server", server_tuning))
            servers[f"embedded/{name}"] = Settings(
                **worker,
                sftp_port=port,
                sftp_host_key=fingerprint,
                sftp_username="bench",
                sftp_password=PASSWORD,
            )

        cases: dict[str, Callable[[], None]] = {}
        for server in ("embedded", "openssh"):
            for name, (client_tuning, _) in CONFIGS.items():
                settings = servers[f"embedded/{name}" if server == "embedded" else "openssh"]
                contender = Contender(settings, sha256, size)
                tune = {**defaults, **client_tuning}

                def down(contender: Contender = contender, tune: dict[str, Any] = tune) -> None:
                    for key, value in tune.items():
                        setattr(sftp_client, key, value)
                    contender.download(path, dest)

                def up(contender: Contender = contender, tune: dict[str, Any] = tune) -> None:
                    for key, value in tune.items():
                        setattr(sftp_client, key, value)
                    contender.upload(local, out_path)

                cases[f"{server}|{name}|download"] = down
                cases[f"{server}|{name}|upload"] = up
            settings = servers["openssh" if server == "openssh" else "embedded/tuned"]
            root = settings.sftp_root
            cases[f"{server}|stock paramiko|download"] = lambda s=settings, r=root: stock(
                s, "download", posixpath.join(r, path), dest
            )
            cases[f"{server}|stock paramiko|upload"] = lambda s=settings, r=root: stock(
                s, "upload", posixpath.join(r, out_path), local
            )

        seconds: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(args.rounds):
            for name, run in cases.items():
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
                dest.unlink(missing_ok=True)
                uploaded.unlink(missing_ok=True)
                print(f"round {round_ + 1} {name}: {size / MB / seconds[name][-1]:.0f} MB/s", file=sys.stderr)
        for key, value in defaults.items():
            setattr(sftp_client, key, value)

    print(f"SFTP tuning, {args.size_mb} MiB file on loopback, median of {args.rounds} rounds")
    print("MB/s (10^6 bytes/s) and, in brackets, the ratio to tuned")
    for server in ("embedded", "openssh"):
        print(f"  our client against {'our embedded server' if server == 'embedded' else 'OpenSSH sshd'}:")
        rate = {k: size / MB / statistics.median(v) for k, v in seconds.items() if k.startswith(server + "|")}
        tuned = rate[f"{server}|tuned|download"], rate[f"{server}|tuned|upload"]
        for name in [*CONFIGS, "stock paramiko"]:
            down, up = rate[f"{server}|{name}|download"], rate[f"{server}|{name}|upload"]
            ratios = f"({down / tuned[0]:.2f})   upload {up:5.0f} ({up / tuned[1]:.2f})"
            print(f"    {name:<24} download {down:5.0f} {ratios}")


if __name__ == "__main__":
    main()
