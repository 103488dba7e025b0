"""Submit and control throughput of server replicas on PostgreSQL, against one server on SQLite.

Layouts, measured in one run and interleaved round by round: one server on SQLite (the
baseline), and 1, 2 and 3 replicas of one server on a fresh PostgreSQL database, each started
as users start it (``morag-pipeline server``; replicas share one files folder and one SFTP host
key) on a fresh vhost. For each:

- submits: U small Markdown files uploaded through ``POST /api/v1/tasks`` by C client threads,
  spread over the replicas' APIs in turn (no worker runs: the tasks stay queued); uploads/s.
- control: K signed ``task_note`` reports about those tasks, published as an enrolled worker
  publishes them (its token; the signing middleware) while every replica is frozen (SIGSTOP);
  the replicas are thawed together and timed until the last note is in the store; control
  messages/s. Every replica consumes ``control`` with its one thread.

Prints the median of R rounds per layout and the ratios against SQLite with one server.

    .venv/bin/python -m bench.replicas --uploads 400 --notes 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from sqlalchemy import func, select

from tests.conftest import BIN, Stack, free_port, fresh_postgres_database, fresh_vhost, open_stack

NOTE = "bench note"


@contextmanager
def layout(backend: str, replicas: int) -> Iterator[tuple[Stack, list[str], str | Path]]:
    """Servers of one layout; yields the stack, every replica's URL and the store's database."""
    with ExitStack() as stack_of:
        tmp = Path(stack_of.enter_context(tempfile.TemporaryDirectory()))
        vhost = stack_of.enter_context(fresh_vhost())
        env: dict[str, str] = {"MORAG_LOG_LEVEL": "WARNING"}
        if backend == "postgresql":
            database = stack_of.enter_context(fresh_postgres_database("morag_bench_replicas"))
            shared = tmp / "shared"
            env.update(MORAG_DATABASE_URL=database, MORAG_FILES_DIR=str(shared / "files"),
                       MORAG_SFTP_SERVER_KEY_FILE=str(shared / "sftp_host_ed25519_key"))  # fmt: skip
        stack = stack_of.enter_context(open_stack(tmp, vhost, env=env))
        store: str | Path = database if backend == "postgresql" else stack.data_dir / "tasks.db"
        stack.start_server()
        urls = [stack.url]
        for n in range(1, replicas):
            port = free_port()
            own = {"MORAG_DATA_DIR": str(tmp / f"data-{n}"), "MORAG_API_PORT": str(port),
                   "MORAG_SFTP_PORT": str(free_port())}  # fmt: skip
            stack.spawn(f"server-{n}", [str(BIN / "morag-pipeline"), "server"], **own)
            urls.append(f"http://127.0.0.1:{port}")
            wait_healthy(stack, urls[-1])
        yield stack, urls, store


def wait_healthy(stack: Stack, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"replica {url} did not start:\n{stack.all_logs()}")


def submits(
    stack: Stack, urls: list[str], uploads: int, clients: int, folder: Path
) -> tuple[float, list[str]]:
    """Uploads per second, and the ids of the tasks made."""
    files = []
    for n in range(uploads):
        path = folder / f"doc-{n:05}.md"
        path.write_text(f"# Document {n}\n\nA paragraph of the replica benchmark.\n")
        files.append(path)
    local = threading.local()

    def upload(n: int) -> str:
        if not hasattr(local, "client"):
            local.client = httpx.Client(headers=stack.headers, timeout=60)
        with files[n].open("rb") as f:
            response = local.client.post(
                f"{urls[n % len(urls)]}/api/v1/tasks", files={"file": (files[n].name, f)}
            )
        response.raise_for_status()
        return response.json()["id"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        ids = list(pool.map(upload, range(uploads)))
    return uploads / (time.perf_counter() - started), ids


def notes_applied(database: str | Path) -> int:
    from pipeline.db import Database
    from pipeline.schema import events

    with Database(database).read() as db:
        return int(db.execute(select(func.count()).where(events.c.event == NOTE)).scalar() or 0)


def control(stack: Stack, database: str | Path, ids: list[str], notes: int, folder: Path) -> float:
    """Control messages applied per second by every replica's consumer together."""
    bundle = stack.enroll("bench-worker", "cpu")
    (folder / "ids.json").write_text(json.dumps(ids))
    servers = [proc for name, proc in stack.processes.items() if name.startswith("server")]
    for proc in servers:
        os.killpg(proc.pid, signal.SIGSTOP)
    try:
        worker_env = {**stack.worker_env(), **bundle, "MORAG_DATA_DIR": str(folder / "worker")}
        subprocess.run(
            [sys.executable, "-m", "bench.replicas", "--publish-notes", str(notes), str(folder / "ids.json")],
            env=worker_env,
            check=True,
        )
    finally:
        for proc in servers:
            os.killpg(proc.pid, signal.SIGCONT)
    started = time.perf_counter()
    while notes_applied(database) < notes:
        if time.perf_counter() - started > 600:
            raise RuntimeError(f"control notes not applied in 600 s:\n{stack.all_logs()}")
        time.sleep(0.02)
    return notes / (time.perf_counter() - started)


def publish_notes(count: int, ids_file: Path) -> None:
    """As an enrolled worker (settings from the environment): ``count`` signed task notes."""
    from pipeline import control
    from pipeline.brokers import current_broker

    ids = json.loads(ids_file.read_text())
    broker = current_broker()
    for n in range(count):
        control.send(broker, control.TASK_NOTE, task_id=ids[n % len(ids)], event=NOTE, detail={"n": n})
    broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--notes", type=int, default=2000)
    parser.add_argument("--replicas", default="1,2,3", help="replica counts on PostgreSQL")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--publish-notes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("ids_file", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish_notes is not None:
        publish_notes(args.publish_notes, args.ids_file)
        return

    layouts = [("sqlite", 1), *(("postgresql", int(n)) for n in args.replicas.split(","))]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {name: [] for name in layouts}
    for round_ in range(args.rounds):
        for backend, replicas in layouts:
            with layout(backend, replicas) as (stack, urls, database), tempfile.TemporaryDirectory() as tmp:
                rate, ids = submits(stack, urls, args.uploads, args.clients, Path(tmp))
                applied = control(stack, database, ids, args.notes, Path(tmp))
            results[(backend, replicas)].append((rate, applied))
            print(f"round {round_ + 1} {backend} x{replicas}: {rate:.0f} uploads/s, {applied:.0f} control/s",
                  file=sys.stderr)  # fmt: skip

    medians = {
        name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        for name, runs in results.items()
    }
    print(f"replicas: {args.uploads} uploads from {args.clients} clients, {args.notes} control messages, "
          f"median of {args.rounds} round(s)")  # fmt: skip
    print(f"  {'layout':<16} {'uploads/s':>10} {'control/s':>10}")
    for (backend, replicas), (rate, applied) in medians.items():
        print(f"  {f'{backend} x{replicas}':<16} {rate:>10.0f} {applied:>10.0f}")
    base_rate, base_applied = medians[("sqlite", 1)]
    for (backend, replicas), (rate, applied) in medians.items():
        if backend == "postgresql":
            print(f"  ratio postgresql x{replicas}/sqlite x1: submits {rate / base_rate:.2f}, "
                  f"control {applied / base_applied:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
